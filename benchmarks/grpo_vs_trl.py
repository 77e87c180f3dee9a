"""GRPO training speed on CPU: posttrain's `grpo` stage against TRL's GRPOTrainer, same model, prompts and group size.

    python benchmarks/grpo_vs_trl.py [--steps 8] [--prompts-per-step 16] [--group 8] [--max-new-tokens 40]
                                     [--lr 3e-5] [--beta 0.04] [--threads 2] [--model DIR] [--only trl|posttrain]
                                     [--repeats 1]

One invocation saves a model once (by default posttrain's random tiny Llama, ~0.8M parameters, char tokenizer; or
`--model DIR`, e.g. an SFT checkpoint whose rewards vary) and the arithmetic task's pool of steps x prompts-per-step
problems, then trains GRPO on both sides: each optimizer step samples prompts-per-step x group completions
(temperature 1, top_p 1, top_k 0, at most max-new-tokens), scores them 1/0 with posttrain's `arithmetic_steps`
verifier, and makes one update on that rollout (float32, AdamW betas (0.9, 0.95), constant lr, grad clip 1.0,
KL beta to the starting policy).

TRL:       GRPOTrainer in one process with `--threads` torch threads: HF generate, reward function, reference and
           policy forwards and backward in that process. A step is timed from on_step_begin to on_step_end
           (generation, rewards, loss, backward, clipping, optimizer); logging after a step is left out.
posttrain: `posttrain run` on a generated recipe: embedded Ray, 2 DeepSpeed learners (ZeRO stage 0: plain data
           parallelism), 2 HF samplers and a verifier on `--threads` CPUs (Ray num_cpus). A step is the grpo loop's
           own `step_s` (sample + reward + update + weight sync).

Seconds per step are the median and mean over the steps after the first (warm-up); completions/s is completions per
step over step seconds. `--repeats R` runs both sides R times, alternating which goes first (a shared machine's
speed drifts by tens of percent over minutes), and reports every run and the median over runs. Left out on both
sides: model loading, tokenisation, trainer / cluster construction. The posttrain process's whole wall time (Ray
start-up, actors, model loads, the final checkpoint) is shown on its own line. Each side runs in its own spawned
process; posttrain's pipeline runs in a subprocess of that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# Inherited by the children and posttrain's subprocess: deepspeed must not look for a GPU; nothing is downloaded.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
                  TOKENIZERS_PARALLELISM="false")

RUN_NAME = "grpo_bench"
VERIFIER = "arithmetic_steps"
POSTTRAIN_TIMEOUT_S = 3600  # a wedged Ray cluster must not hang the benchmark


# ------------------------------------------------------------------------------------------------ shared


def arithmetic_config(n_pool: int) -> dict:
    return dict(n_operands=4, max_operand=9, n_sft=0, n_pool=n_pool, n_test=0)


def load_pool(n_pool: int) -> list[dict[str, str]]:
    """The task's pool split, as posttrain's `train_split: pool` sees it."""
    from posttrain.data.tasks.arithmetic import ArithmeticConfig, build_splits

    pool = build_splits(ArithmeticConfig(**arithmetic_config(n_pool)))["pool"]
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in pool]


def is_correct(completion: str, answer: str) -> bool:
    """What posttrain's VerifierWorker decides: the answer extracted (work checked) and equal to the reference."""
    from posttrain.verifiers import get_verifier

    v = get_verifier(VERIFIER)
    got = v.extract(completion)
    return got is not None and v.equal(got, answer)


def summarise(name: str, step_s: list[float], completions_per_s: list[float], rewards: list[float]) -> dict:
    """Median/mean over the steps after the first (all of them if there is only one)."""
    timed = step_s[1:] or step_s
    rates = completions_per_s[1:] or completions_per_s
    return {"name": name, "steps": len(step_s), "median_s": statistics.median(timed), "mean_s": statistics.fmean(timed),
            "completions_per_s": statistics.median(rates), "first_s": step_s[0],
            "reward_first": rewards[0] if rewards else float("nan"),
            "reward_last": rewards[-1] if rewards else float("nan")}


def child_setup(threads: int) -> None:
    """First thing in a child: the thread count, and only errors from the libraries (the figures are ours)."""
    import logging

    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def in_child(fn, job: dict) -> dict:
    """Run fn(job) in a fresh spawned interpreter: neither side inherits the other's threads, caches or imports."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(fn, job).result()


# ------------------------------------------------------------------------------------------------ TRL


def trl_config(job: dict, out_dir: str):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir, use_cpu=True, seed=0, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
        per_device_train_batch_size=job["prompts_per_step"] * job["group"],  # counted in completions
        gradient_accumulation_steps=1, num_generations=job["group"], num_iterations=1, max_steps=job["steps"],
        max_completion_length=job["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        beta=job["beta"], learning_rate=job["lr"], lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        loss_type="grpo",  # per-sequence token mean, then the mean over samples: posttrain's default aggregation
        gradient_checkpointing=False,  # TRL's default is on; posttrain does not recompute activations
        shuffle_dataset=False,  # consecutive prompts of the pool, as many as posttrain trains on
        dataloader_num_workers=0, disable_tqdm=True, model_init_kwargs={"dtype": "float32"})


def run_trl(job: dict) -> dict:
    child_setup(job["threads"])
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    rewards: list[float] = []  # mean reward of each rollout (the reward function runs once per step)
    step_s: list[float] = []

    def verifier_reward(completions: list[str], answer: list[str], **_) -> list[float]:
        scores = [float(is_correct(c, a)) for c, a in zip(completions, answer)]
        rewards.append(statistics.fmean(scores))
        return scores

    class StepClock(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_s.append(time.perf_counter() - self.t0)

    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    tok.padding_side = "left"  # TRL left-pads prompts itself; this keeps any tokenizer-side padding consistent
    data = Dataset.from_list(job["rows"])
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = GRPOTrainer(model=job["model_dir"], reward_funcs=verifier_reward, args=trl_config(job, out_dir),
                              train_dataset=data, processing_class=tok, callbacks=[StepClock()])
        trainer.remove_callback(PrinterCallback)  # it prints every log dict
        trainer.train()
    n = job["prompts_per_step"] * job["group"]
    return summarise("TRL", step_s, [n / s for s in step_s], rewards)


# ------------------------------------------------------------------------------------------------ posttrain


def recipe(job: dict) -> dict:
    """The benchmark's recipe: the grpo stage's spec, on the same model, pool, sampling and optimizer as TRL."""
    n = job["prompts_per_step"] * job["group"]
    return {
        "name": RUN_NAME, "seed": 0,
        "model": {"path": job["model_dir"], "dtype": "float32"},
        "data": {"arithmetic": {"task": "arithmetic", "arithmetic": arithmetic_config(job["n_pool"]),
                                "verifier": VERIFIER}},
        "cluster": {"address": "local", "num_cpus": job["threads"],
                    # plain data parallelism: at 0.8M parameters ZeRO's partitioning costs more than it saves
                    # (ZeRO-2's gradient hooks and parameter gather: ~10 ms a step more here)
                    "learner": {"actors": 2, "cpus": 1, "backend": "deepspeed", "zero_stage": 0},
                    "sampler": {"actors": 2, "cpus": 1, "backend": "hf", "batch_size": 512},
                    "verifier": {"actors": 1, "cpus": 0}},
        "tracking": {"wandb": False, "report": False},
        "stages": [{
            "kind": "grpo", "data": "arithmetic", "train_split": "pool", "steps": job["steps"],
            "prompts_per_step": job["prompts_per_step"], "samples_per_prompt": job["group"],
            "micro_batch_size": n // 2,  # one micro-batch per learner per step
            "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": job["max_new_tokens"]},
            "reward": {"source": "verifier"}, "grpo": {"beta": job["beta"]},
            "optim": {"lr": job["lr"], "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
            "log_every": 1, "save_every": job["steps"]}],
    }


def write_recipe(job: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe(job), sort_keys=False, default_flow_style=None))
    return path


def read_grpo_metrics(metrics_path: Path) -> list[dict]:
    """The grpo stage's per-step records (those with step_s), in step order."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return sorted((r for r in records if r.get("stage") == "grpo" and r.get("step_s") is not None),
                  key=lambda r: r["step"])


def summarise_posttrain(records: list[dict], completions_per_step: int) -> dict:
    if not records:
        raise ValueError("no grpo records with step_s in metrics.jsonl")
    step_s = [r["step_s"] for r in records]
    rates = [r.get("completions_per_s") or completions_per_step / r["step_s"] for r in records]
    return summarise("posttrain", step_s, rates, [r["reward_mean"] for r in records if "reward_mean" in r])


def run_posttrain(job: dict) -> dict:
    """`posttrain run` in a fresh working directory; its metrics.jsonl holds the per-step timings."""
    with tempfile.TemporaryDirectory() as cwd:
        path = write_recipe(job, Path(cwd) / "recipe.yaml")
        log = Path(cwd) / "posttrain.log"
        cmd = [sys.executable, "-m", "posttrain.cli", "run", str(path)]
        t0 = time.perf_counter()
        with log.open("w") as out:
            rc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                timeout=POSTTRAIN_TIMEOUT_S).returncode
        wall_s = time.perf_counter() - t0
        metrics = Path(cwd) / "runs" / RUN_NAME / "metrics.jsonl"  # tracking.output_dir "runs", relative to cwd
        if rc != 0 or not metrics.is_file():
            tail = "\n".join(log.read_text().splitlines()[-25:])
            return {"name": "posttrain", "error": f"`posttrain run` exited {rc} after {wall_s:.0f} s:\n{tail}"}
        try:
            result = summarise_posttrain(read_grpo_metrics(metrics), job["prompts_per_step"] * job["group"])
        except (ValueError, KeyError) as exc:  # the run finished but did not log what the benchmark reads
            return {"name": "posttrain", "error": f"{metrics.name} unreadable: {type(exc).__name__}: {exc}"}
    return {**result, "wall_s": wall_s}


# ------------------------------------------------------------------------------------------------ report


def report(runs: list[list[dict]], args: argparse.Namespace, model_desc: str, wall_s: float) -> None:
    """runs: one list of results per repeat."""
    n = args.prompts_per_step * args.group
    print(f"\nGRPO on CPU, {model_desc}: {args.steps} steps x {args.prompts_per_step} prompts x {args.group} "
          f"completions ({n}/step), <= {args.max_new_tokens} new tokens, beta {args.beta}, lr {args.lr}, "
          f"{args.threads} threads")
    print("s/step and completions/s: median over the steps after the first\n")
    head = (f"{'side':<10} {'run':>3} {'s/step med':>10} {'s/step mean':>11} {'compl/s':>8} {'first s':>8} "
            f"{'reward 1st':>10} {'last':>6}")
    print(head)
    print("-" * len(head))
    for i, results in enumerate(runs, 1):
        for r in results:
            if "error" not in r:
                print(f"{r['name']:<10} {i:>3} {r['median_s']:>10.2f} {r['mean_s']:>11.2f} "
                      f"{r['completions_per_s']:>8.1f} {r['first_s']:>8.2f} {r['reward_first']:>10.3f} "
                      f"{r['reward_last']:>6.3f}")
    for i, results in enumerate(runs, 1):
        for r in results:
            if "wall_s" in r:
                print(f"\nposttrain process wall time (run {i}), incl. Ray start-up, actors, model loads and "
                      f"checkpoint: {r['wall_s']:.1f} s for {r['steps']} steps")
            if "error" in r:
                print(f"\n{r['name']} FAILED (run {i}): {r['error']}")
    medians: dict[str, list[float]] = {}
    ratios = []
    for results in runs:
        by_name = {r["name"]: r for r in results if "error" not in r}
        for name, r in by_name.items():
            medians.setdefault(name, []).append(r["median_s"])
        if {"TRL", "posttrain"} <= by_name.keys():
            ratios.append(by_name["TRL"]["median_s"] / by_name["posttrain"]["median_s"])
    if ratios:
        print("\nspeed-up (TRL s/step / posttrain s/step, medians): "
              + ", ".join(f"{x:.2f}x" for x in ratios))
    if len(runs) > 1 and {"TRL", "posttrain"} <= medians.keys():
        trl, post = statistics.median(medians["TRL"]), statistics.median(medians["posttrain"])
        print(f"over {len(runs)} runs: TRL {trl:.3f} s/step, posttrain {post:.3f} s/step (medians of the runs' "
              f"medians): {trl / post:.2f}x; median of the runs' speed-ups {statistics.median(ratios):.2f}x")
    print(f"benchmark wall time: {wall_s:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps (one rollout each)")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (GRPO group size)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--beta", type=float, default=0.04, help="KL weight to the starting policy")
    ap.add_argument("--threads", type=int, default=2, help="TRL's torch threads; posttrain's Ray num_cpus")
    ap.add_argument("--model", help="existing HF model dir (default: build posttrain's random tiny Llama)")
    ap.add_argument("--only", choices=["trl", "posttrain"], help="run one side only")
    ap.add_argument("--repeats", type=int, default=1, help="run both sides this many times, alternating the order")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.group < 2 or args.prompts_per_step * args.group % 2:
        ap.error("--group must be >= 2 and prompts-per-step x group even (two learners)")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir, model_desc = str(Path(args.model).resolve()), f"model {args.model}"
        else:
            from posttrain.models.tiny import TinyConfig, build_tiny_model

            model_dir = str(build_tiny_model(Path(tmp) / "model", TinyConfig(hidden_size=128, num_layers=3,
                                                                                  num_heads=4)))
            model_desc = "random tiny Llama (128 wide, 3 layers)"
        n_pool = args.steps * args.prompts_per_step  # one pass: no prompt is seen twice
        job = {"model_dir": model_dir, "n_pool": n_pool, "rows": load_pool(n_pool), "steps": args.steps,
               "prompts_per_step": args.prompts_per_step, "group": args.group,
               "max_new_tokens": args.max_new_tokens, "lr": args.lr, "beta": args.beta, "threads": args.threads}
        sides = [(side, fn) for side, fn in (("trl", run_trl), ("posttrain", run_posttrain))
                 if args.only in (None, side)]
        runs = []
        for i in range(args.repeats):
            order = sides if i % 2 == 0 else sides[::-1]
            results = {side: in_child(fn, job) for side, fn in order}
            runs.append([results[side] for side, _ in sides])
    report(runs, args, model_desc, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
