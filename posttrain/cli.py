"""posttrain command line: parse, call, print. User errors print one message (no traceback) and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from posttrain.errors import PosttrainError

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after flags (`run r.yaml --resume seed=3`): collect the stray key=value ones.
    args, extra = parser.parse_known_args(argv)
    strays = [t for t in extra if "=" in t and not t.startswith("-")]
    if len(strays) != len(extra) or (strays and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(t for t in extra if t not in strays) or ' '.join(extra)}")
    if strays:
        args.overrides = [*args.overrides, *strays]
    logging.basicConfig(level=logging.INFO if not getattr(args, "quiet", False) else logging.WARNING,
                        format="posttrain: %(message)s")
    try:
        return args.func(args) or 0
    except PosttrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: completed checkpoints are intact; continue with `posttrain run RECIPE --resume`",
              file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Distributed LLM post-training on Ray + DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_cmd(name: str, help: str):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("recipe", help="recipe YAML file")
        sp.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe values")
        return sp

    sp = recipe_cmd("validate", "check a recipe and report every problem with file:line and field")
    sp.set_defaults(func=_validate)
    sp = recipe_cmd("show", "print the resolved recipe (defaults filled in, overrides applied)")
    sp.set_defaults(func=_show)
    sp = recipe_cmd("run", "run a recipe's stages")
    sp.add_argument("--dry-run", action="store_true", help="print the plan and start nothing")
    sp.add_argument("--resume", action="store_true", help="skip finished stages, restart the interrupted one from its last checkpoint")
    sp.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    sp.set_defaults(func=_run)
    address_help = ("the head's job API, http://HEAD:8265 (default: $RAY_ADDRESS when it is an http(s) URL, "
                    "else http://127.0.0.1:8265)")
    sp = recipe_cmd("submit", "run a recipe as a Ray job on a cluster (uploads the working directory)")
    sp.add_argument("--address", help=address_help)
    sp.add_argument("--working-dir", default=".", metavar="DIR",
                    help="directory shipped to the cluster; must hold the recipe and the local files it names "
                         "(default: the current directory)")
    sp.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 1 unless it succeeded")
    sp.add_argument("--resume", action="store_true", help="the job runs `posttrain run --resume` (continue a run)")
    sp.set_defaults(func=_submit)
    sp = sub.add_parser("jobs", help="list the cluster's jobs")
    sp.add_argument("--address", help=address_help)
    sp.set_defaults(func=_jobs)
    sp = sub.add_parser("logs", help="print a job's logs (exit 1 if it failed or was stopped)")
    sp.add_argument("job", help="job (submission) id, as printed by submit")
    sp.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    sp.add_argument("--address", help=address_help)
    sp.set_defaults(func=_logs)
    sp = sub.add_parser("stop", help="stop a running job")
    sp.add_argument("job", help="job (submission) id")
    sp.add_argument("--address", help=address_help)
    sp.set_defaults(func=_stop)
    sp = sub.add_parser("list", help="stage kinds, algorithms, verifiers and bundled recipes")
    sp.set_defaults(func=_list)
    sp = sub.add_parser("verify", help="check one answer or program with a verifier and print the verdict as JSON")
    vsub = sp.add_subparsers(dest="verifier", required=True, metavar="{math,code}")
    vp = vsub.add_parser("math", help="a math answer against a reference answer")
    vp.add_argument("prediction", help="model output (a bare answer or a full solution)")
    vp.add_argument("reference", help="reference answer (or a full reference solution)")
    vp.set_defaults(func=_verify_math)
    vp = vsub.add_parser("code", help="a program against HumanEval-style tests, in the sandbox")
    vp.add_argument("--program", required=True, help="Python file defining the function under test")
    vp.add_argument("--tests", required=True, help="Python file defining check(candidate)")
    vp.add_argument("--entry", required=True, help="name of the function under test")
    vp.add_argument("--timeout", type=float, default=10.0, help="seconds for the tests (default 10)")
    vp.set_defaults(func=_verify_code)
    sp = sub.add_parser("export", help="write a checkpoint as a plain Hugging Face model (LoRA merged into the base)")
    sp.add_argument("checkpoint", help="checkpoint directory (full model or peft adapter)")
    sp.add_argument("out", help="output directory (must not exist)")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sp.set_defaults(func=_export)
    return p


def _load(args):
    from posttrain.recipe.load import load_recipe

    return load_recipe(args.recipe, args.overrides)


def _validate(args) -> int:
    recipe = _load(args)
    print(f"{args.recipe}: ok ({len(recipe.stages)} stage(s): {', '.join(s.name for s in recipe.stages)})")
    return 0


def _show(args) -> int:
    from posttrain.recipe.load import dump_recipe

    print(dump_recipe(_load(args)), end="")
    return 0


def _run(args) -> int:
    from posttrain import pipeline

    recipe = _load(args)
    if args.dry_run:
        print(pipeline.plan(pipeline.absolute_paths(recipe)))
        return 0
    out = pipeline.run(recipe, resume=args.resume)
    summary = json.loads((out / pipeline.SUMMARY).read_text())
    from posttrain.tracking import format_metrics

    for s in summary["stages"]:
        print(f"{s['name']}: {format_metrics(s['metrics'])}" + (f"  [checkpoint {s['checkpoint']}]" if s.get("checkpoint") else ""))
    report = out / "report.html"
    print(f"run directory: {out}" + (f"\nreport: {report}" if report.exists() else ""))
    return 0


def _submit(args) -> int:
    import shlex

    from posttrain import jobs

    job = jobs.submit(args.recipe, args.overrides, args.address, args.working_dir, args.resume)
    addr = shlex.quote(job.url)
    print(f"submitted job {job.job_id} to {job.url}\n  command: {job.entrypoint}\n"
          f"  follow:  posttrain logs {job.job_id} --follow --address {addr}\n"
          f"  stop:    posttrain stop {job.job_id} --address {addr}\n"
          f"  list:    posttrain jobs --address {addr}", flush=True)
    return _follow(job.client, job.job_id, job.url) if args.follow else 0


def _jobs(args) -> int:
    from posttrain import jobs

    client, _ = jobs.connect(args.address)
    print(jobs.jobs_table(client.list_jobs()))
    return 0


def _logs(args) -> int:
    from posttrain import jobs

    client, url = jobs.connect(args.address)
    if args.follow:
        return _follow(client, args.job, url)
    jobs.job_info(client, args.job, url)  # an unknown id: a clear message
    print(client.get_job_logs(args.job), end="", flush=True)
    status, line = jobs.outcome(client, args.job, url)
    print(line, file=sys.stderr)
    return 1 if status in ("FAILED", "STOPPED") else 0


def _follow(client, job_id: str, url: str) -> int:
    """Stream until the job ends; exit 0 only if it succeeded. Ctrl-C stops following, not the job."""
    from posttrain import jobs

    try:
        jobs.follow(client, job_id, url)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running. Follow again: posttrain logs {job_id} --follow "
              f"--address {url}; stop it: posttrain stop {job_id} --address {url}", file=sys.stderr)
        return 130
    status, line = jobs.outcome(client, job_id, url)
    print(line, file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _stop(args) -> int:
    from posttrain import jobs

    client, url = jobs.connect(args.address)
    was_running, status = jobs.stop(client, args.job, url)
    if not was_running:
        print(f"job {args.job} had already ended: {status}")
    else:
        print(f"job {args.job}: {status}" + ("" if status in jobs.TERMINAL else " (stop requested; Ray kills it shortly)"))
    return 0


def _list(args) -> int:
    from posttrain.algorithms import ALGORITHM_DESCRIPTIONS
    from posttrain.recipe.schema import STAGE_DESCRIPTIONS
    from posttrain.verifiers import VERIFIER_DESCRIPTIONS

    rows = [("stage", k, v) for k, v in STAGE_DESCRIPTIONS.items()]
    rows += [("algorithm", k, v) for k, v in ALGORITHM_DESCRIPTIONS.items()]
    rows += [("verifier", k, v) for k, v in VERIFIER_DESCRIPTIONS.items()]
    rows += [("recipe", str(p), _first_comment(p)) for p in bundled_recipes()]
    width = max(len(r[1]) for r in rows)
    for kind, name, desc in rows:
        print(f"{kind:<9} {name:<{width}}  {desc}")
    return 0


def bundled_recipes() -> list[Path]:
    """Recipes shipped beside the package (source checkout), shown relative to the working directory."""
    root = Path(__file__).resolve().parent.parent / "recipes"
    found = sorted(root.glob("*.yaml")) if root.is_dir() else []
    cwd = Path.cwd()
    return [p.relative_to(cwd) if p.is_relative_to(cwd) else p for p in found]


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _verify_math(args) -> int:
    from posttrain.verifiers.math import verify_cli

    print(json.dumps(verify_cli(args.prediction, args.reference)))
    return 0


def _verify_code(args) -> int:
    """Exit 0 whenever the sandbox worked, whatever the verdict ("passed" in the JSON); 2 on bad input."""
    from posttrain.verifiers.code import verify_cli
    from posttrain.verifiers.sandbox import Limits, SandboxError

    for flag, path in (("--program", args.program), ("--tests", args.tests)):
        if not Path(path).is_file():
            raise PosttrainError(f"{flag} {path}: no such file")
    if not args.entry.isidentifier():
        raise PosttrainError(f"--entry {args.entry!r} is not a Python identifier")
    limits = Limits(test_seconds=args.timeout, cpu_seconds=max(1, int(args.timeout) + 1))
    try:
        result = verify_cli(args.program, args.tests, args.entry, limits)
    except SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def _export(args) -> int:
    from posttrain.models.load import is_adapter_dir, merge_adapter

    src, out = Path(args.checkpoint), Path(args.out)
    if out.exists():
        raise PosttrainError(f"export: {out} already exists; choose a new output directory")
    if not src.is_dir():
        raise PosttrainError(f"export: no such checkpoint directory: {src}")
    if is_adapter_dir(src):
        merge_adapter(src, out, args.dtype)
    else:
        from posttrain.models.load import load_causal_lm, load_tokenizer

        load_causal_lm(src, args.dtype, trainable=False).save_pretrained(out, safe_serialization=True)
        load_tokenizer(src).save_pretrained(out)
    print(f"wrote {out} (Hugging Face format, safetensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
