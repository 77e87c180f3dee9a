"""Run a recipe's stages in order: each stage's checkpoint feeds the next; --resume picks up where a run stopped.

runs/<name>/ holds summary.json (the run's state, rewritten atomically after every stage change),
metrics.jsonl, recipe.yaml (as resolved), one directory per stage, and report.html at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from posttrain.backends import check_backends
from posttrain.errors import PosttrainError
from posttrain.memory import resource_lines
from posttrain.recipe.load import dump_recipe, recipe_to_dict
from posttrain.recipe.schema import (PAIR_FORMATS, CriticConfig, DPOStage, LongCtxSFTStage, OnlineRLStage, Recipe,
                                     RestEMStage, RewardModelStage, SFTStage)
from posttrain.verifiers import votes

log = logging.getLogger(__name__)
SUMMARY = "summary.json"


def run_dir(recipe: Recipe) -> Path:
    return Path(recipe.tracking.output_dir).expanduser().resolve() / recipe.name


def absolute_paths(recipe: Recipe) -> Recipe:
    """A copy with every user path made absolute, so actors (whose cwd differs) see the same files."""
    r = dataclasses.replace(recipe)
    r.model = dataclasses.replace(recipe.model, path=_abs(recipe.model.path))
    r.data = {k: dataclasses.replace(d, path=_abs(d.path) if d.path else None) for k, d in recipe.data.items()}
    r.stages = [dataclasses.replace(s, model=_abs(s.model) if s.model and not s.model.startswith("@") else s.model)
                for s in recipe.stages]
    for s in r.stages:
        online = getattr(s, "online", None)
        if online and online.reward_model and not online.reward_model.startswith("@"):
            s.online = dataclasses.replace(online, reward_model=_abs(online.reward_model))
        reward, critic = getattr(s, "reward", None), getattr(s, "critic", None)
        if reward and reward.reward_model and not reward.reward_model.startswith("@"):
            s.reward = dataclasses.replace(reward, reward_model=_abs(reward.reward_model))
        if critic and critic.model and not critic.model.startswith("@"):
            s.critic = dataclasses.replace(critic, model=_abs(critic.model))
    r.tracking = dataclasses.replace(recipe.tracking, output_dir=str(Path(recipe.tracking.output_dir).expanduser().resolve()))
    return r


def _abs(path: str) -> str:
    p = Path(path).expanduser()
    # Hub ids ("org/model") stay as they are; anything that exists or looks like a path is resolved.
    return str(p.resolve()) if p.exists() or path.startswith((".", "/", "~")) else path


def check_recipe_resources(recipe: Recipe, available: dict[str, float]) -> None:
    from posttrain.cluster import check_fits, stage_phases

    for s in recipe.stages:
        for phase in stage_phases(recipe.cluster, s):
            check_fits(s.name, phase, available)


def ensure_model(recipe: Recipe) -> None:
    """Build the embedded tiny model if the recipe asks for it and it is not there; then check the path."""
    from posttrain.models.load import check_model_path

    if recipe.model.tiny is not None and not Path(recipe.model.path).exists():
        from posttrain.models.tiny import build_tiny_model

        log.info("building the tiny Llama model at %s", recipe.model.path)
        build_tiny_model(recipe.model.path, recipe.model.tiny)
    if recipe.model.ssm is not None and not Path(recipe.model.path).exists():
        from posttrain.longctx.ssm import build_ssm_model

        spec = recipe.model.ssm
        log.info("building the selective SSM at %s", recipe.model.path)
        build_ssm_model(recipe.model.path, spec.vocab_size, spec.hidden_size, spec.state_size, spec.num_layers,
                        spec.max_timescale, spec.seed)
    check_model_path(recipe.model.path)
    for i, s in enumerate(recipe.stages):
        if s.model and not s.model.startswith("@"):  # "@stage" is resolved when that stage has run
            check_model_path(s.model, f"stages.{i}.model")
        for field, path in (("online.reward_model", getattr(getattr(s, "online", None), "reward_model", None)),
                            ("reward.reward_model", getattr(getattr(s, "reward", None), "reward_model", None)),
                            ("critic.model", getattr(getattr(s, "critic", None), "model", None))):
            if path and not path.startswith("@"):  # "@stage" is resolved when that stage has run
                check_model_path(path, f"stages.{i}.{field}")


# ---------------------------------------------------------------------- plan
def plan(recipe: Recipe) -> str:
    """The resolved plan printed by --dry-run: stages, actors and resources, data sizes, outputs."""
    from posttrain.cluster import local_resources, stage_phases
    from posttrain.data.datasets import from_hub, load_split

    out = run_dir(recipe)
    c = recipe.cluster
    where = (f"embedded local Ray, {local_resources(c)['CPU']:g} CPU(s), {c.num_gpus} GPU(s)"
             if c.address == "local" else f"Ray cluster at {c.address}")
    model = recipe.model
    lines = [f"run {recipe.name!r} -> {out}", f"ray: {where}",
             f"model: {model.path} ({model.dtype}"
             + (", tiny Llama built there if missing" if model.tiny else "")
             + (f", selective SSM (K={model.ssm.num_layers}, P={model.ssm.hidden_size}, N={model.ssm.state_size}) built "
                "there if missing" if model.ssm else "")
             + (f", LoRA r={model.lora.r} alpha={model.lora.alpha} on {','.join(model.lora.target_modules)}" if model.lora else "")
             + ")"]
    sizes: dict[tuple[str, str], int] = {}

    def size(name: str, split: str) -> str:
        if (name, split) not in sizes:
            try:
                cfg = recipe.data[name]
                if cfg.format in PAIR_FORMATS:
                    from posttrain.data.pairs import load_pairs

                    sizes[name, split] = len(load_pairs(name, cfg.path, PAIR_FORMATS[cfg.format], split,
                                                        max_rows=cfg.max_rows)[0])
                else:
                    sizes[name, split] = len(load_split(name, cfg, split))
            except PosttrainError as exc:
                if from_hub(recipe.data[name], split):  # a plan needs no network: say so and go on
                    return f"{name}:{split} (hub dataset {recipe.data[name].path!r}: size unknown, not reachable here)"
                raise PosttrainError(f"dry run: {exc}") from None
        return f"{name}:{split} ({sizes[name, split]:,} rows)"

    for i, s in enumerate(recipe.stages, 1):
        lines.append(f"stage {i} {s.name!r} [{s.kind}]")
        if isinstance(s, SFTStage):
            lr = c.learner
            lines.append(f"  data: train {size(s.data, s.train_split)}"
                         + (f", held-out {size(s.data, s.eval_split)}" if s.eval_split else ""))
            gas = s.batch_size // (lr.actors * s.micro_batch_size)
            lines.append(f"  train: {s.steps} steps x {s.batch_size} sequences ({lr.actors} actor(s) x {gas} micro-batch(es)"
                         f" x {s.micro_batch_size}), lr {s.optim.lr:g} {s.optim.schedule}, warmup {s.optim.warmup_steps}")
            lines.append(f"  learner: {lr.backend}" + (f" ZeRO-{lr.zero_stage}" if lr.backend == "deepspeed" else ""))
            lines.append(f"  checkpoints: {out / s.name / 'checkpoints'}/step-NNNNNN every {s.save_every} steps (keep {s.keep_last})")
        elif isinstance(s, DPOStage):
            lr, o = c.learner, s.online
            gas = s.batch_size // (lr.actors * s.micro_batch_size)
            knobs = ", ".join(f"{k}={v:g}" for k, v in s.loss.knobs().items())
            if o is None:
                lines.append(f"  data: pairs {size(s.data, s.train_split)}" + (
                    "; reward-augmented: each scored pair becomes two, conditioned on its scores"
                    if s.reward_augmented else ""))
            else:
                lines.append(f"  data: problems {size(s.data, s.train_split)}"
                             + (f" ({o.problems_per_round} per round)" if o.problems_per_round else ""))
                how = (f"verified vs failed (up to {o.max_pairs_per_problem}/problem), verifier {recipe.data[s.data].verifier}"
                       if o.label == "verifier" else f"best vs worst by reward model {o.reward_model} (up to "
                       f"{o.max_pairs_per_problem}/problem, margin > {o.min_margin:g})")
                lines.append(f"  {o.rounds} round(s): K={o.samples_per_problem} samples/problem (T={o.sampling.temperature:g}),"
                             f" pairs = {how}; reference = each round's starting policy"
                             + (f"; XPO alpha {o.xpo_alpha:g}" if o.xpo_alpha else ""))
            lines.append(f"  train: {s.steps} steps{' per round' if o else ''} x {s.batch_size} pairs ({lr.actors} actor(s)"
                         f" x {gas} micro-batch(es) x {s.micro_batch_size}), loss {s.loss.name}"
                         + (f" ({knobs})" if knobs else "") + f", lr {s.optim.lr:g} {s.optim.schedule}")
            u = s.reference_update
            if s.loss.name == "simpo":
                pass
            elif s.reference == "precomputed":
                lines.append("  reference log-probs: computed once from the starting weights, saved beside the checkpoints")
            else:
                lines.append("  reference: a frozen copy of the starting weights on each learner, scoring every batch"
                             + (f"; TR-DPO {u.mode} update every {u.tau} steps" + (f" (alpha {u.alpha:g})"
                                if u.mode == "soft" else "") if u else ""))
            lines.append("  batches: " + ("padding-free (sequences packed end to end in rows of max_length "
                                          f"{s.max_length})" if s.packing else f"padded rows (max_length {s.max_length})"))
            lines.append(f"  learner: {lr.backend}" + (f" ZeRO-{lr.zero_stage}" if lr.backend == "deepspeed" else ""))
            lines.append(f"  outputs: {out / s.name}/" + ("round-N/checkpoints, round-N/samples.jsonl, rounds.json"
                                                          if o else "checkpoints"))
        elif isinstance(s, RewardModelStage):
            lr = c.learner
            gas = s.batch_size // (lr.actors * s.micro_batch_size)
            lines.append(f"  data: pairs {size(s.data, s.train_split)}, held-out "
                         + (size(s.data, s.eval_split) if s.eval_split else f"{s.eval_fraction:.0%} of them"))
            lines.append(f"  train: {s.steps} steps x {s.batch_size} pairs ({lr.actors} actor(s) x {gas} micro-batch(es)"
                         f" x {s.micro_batch_size}), Bradley-Terry on a scalar head"
                         + (f" + {s.center_coefficient:g} (r_w + r_l)^2" if s.center_coefficient else "")
                         + f", lr {s.optim.lr:g}; held-out pairwise accuracy every {s.eval_every} steps")
            lines.append(f"  outputs: {out / s.name}/checkpoints (sequence-classification); not the next stage's policy")
        elif isinstance(s, RestEMStage):
            m = s.m_step
            lines.append(f"  data: E-step problems {size(s.data, s.train_split)}"
                         + (f" ({s.problems_per_iteration} per iteration)" if s.problems_per_iteration else "")
                         + (f", held-out {size(s.eval_data or s.data, s.eval_split)}" if s.eval_split else ""))
            lines.append(f"  {s.iterations} iteration(s): E-step K={s.samples_per_problem} samples/problem "
                         f"(T={s.sampling.temperature:g}, top_k={s.sampling.top_k}), keep verified, de-dup, cap "
                         f"{s.max_per_problem}/problem; verifier {recipe.data[s.data].verifier}")
            lines.append(f"  M-step: {m.steps} steps x {m.batch_size} sequences from "
                         f"{'the base model each iteration' if s.from_base else 'the previous iterate'}, lr {m.optim.lr:g}")
            lines.append(f"  outputs: {out / s.name}/iterations.json, iter-N/checkpoints, iter-N/e_step_samples.jsonl")
        elif isinstance(s, OnlineRLStage):
            lines += _rl_plan(recipe, s, size, out)
        elif isinstance(s, LongCtxSFTStage):
            g, kv = s.gradient, recipe.data[s.data].kv_recall
            lines.append(f"  data: train {size(s.data, s.train_split)}" + (
                f", held-out answer accuracy on {size(s.data, s.eval_split)} (first {s.eval_rows}) every "
                f"{s.eval_every} steps" if s.eval_split else "") + f"; documents of {kv.seq_len} tokens, the fact "
                f"{kv.min_distance}-{kv.max_distance} tokens before the question (chance {1 / kv.n_values:.3f})")
            how = {"adjoint": "adjoint, exact (per-layer cotangents, 3T VJPs per layer)" if g.window is None else
                   f"adjoint, truncated to a window of {g.window} tokens", "autograd": "autograd (full graph)",
                   "checkpoint": "autograd with per-layer checkpointing",
                   "literal": "paper-literal double sum (O(T^2) VJPs)"}[g.engine]
            lines.append(f"  train: {s.steps} steps x {s.batch_size} documents, gradient {how}"
                         + (", the paper's top-of-stack cotangent" if g.cotangent == "top" else "")
                         + f", VJP chunks of {g.chunk}, lr {s.optim.lr:g} {s.optim.schedule}")
            lines.append("  runs in the driver" if not g.workers else
                         f"  VJPs on {g.workers} Ray worker(s), split by {g.split}")
            lines.append(f"  checkpoints: {out / s.name / 'checkpoints'}/step-NNNNNN every {s.save_every} steps (keep {s.keep_last})")
        else:
            what = (["greedy pass@1"] if s.greedy else []) + (
                [f"{s.samples} samples/problem -> pass@k{', maj@k' if votes(recipe.data[s.data].verifier) else ''} "
                 f"for k in {s.pass_k}"] if s.samples else []) + (
                [f"re-rank top-{s.rerank_top} answer clusters by {s.rerank_scorer}"] if s.rerank_top else [])
            lines.append(f"  data: {size(s.data, s.split)}" + (f", first {s.max_problems}" if s.max_problems else ""))
            lines.append(f"  eval: {'; '.join(what)}; verifier {recipe.data[s.data].verifier}")
            lines.append(f"  samples: {out / s.name}/samples_*.jsonl")
        phases = stage_phases(c, s)
        for n, phase in enumerate(p for p in phases if p):
            label = "actors" if len(phases) == 1 else f"actors (phase {n + 1})"
            lines.append(f"  {label}: " + "; ".join(str(d) for d in phase))
        lines += resource_lines(recipe, s)  # GPU placement and memory per GPU; refuses what cannot fit
    lines += [f"note: {note}" for note in check_backends(recipe, strict=False)]
    lines.append(f"outputs: {out}/summary.json, metrics.jsonl, report.html")
    return "\n".join(lines)


def _rl_plan(recipe: Recipe, s, size, out: Path) -> list[str]:
    lr, cfg = recipe.cluster.learner, s.objective_config()
    gas = s.batch_size // (lr.actors * s.micro_batch_size)
    reward = (f"verifier {recipe.data[s.data].verifier} ({s.reward.correct:g} if verified, else 0)"
              if s.reward.source == "verifier" else f"reward model {s.reward.reward_model}")
    if s.reward.no_eos_penalty is not None:
        reward += f"; {s.reward.no_eos_penalty:g} without EOS"
    knobs = ", ".join(f"{k}={v}" for k, v in vars(cfg).items())
    lines = [f"  data: prompts {size(s.data, s.train_split)} (prompts over {s.max_prompt_length} tokens left out)"
             + (f", held-out greedy pass@1 on {size(s.data, s.eval_split)}"
                + (f", first {s.eval_problems}" if s.eval_problems else "") + f" every {s.eval_every} steps"
                if s.eval_split else ""),
             f"  {s.steps} steps x {s.prompts_per_step} prompts x {s.samples_per_prompt} samples "
             f"(T={s.sampling.temperature:g}, up to {s.sampling.max_new_tokens} tokens); reward: {reward}",
             f"  updates: {s.epochs} epoch(s) x {s.mini_batches} minibatch(es) of {s.batch_size} sequences ({lr.actors} "
             f"actor(s) x {gas} micro-batch(es) x ~{s.micro_batch_size}), lr {s.optim.lr:g} {s.optim.schedule}",
             f"  {s.kind}: {knobs}" + (f"; truncated IS at {s.truncated_is:g}" if s.truncated_is else "")
             + (f"; z-loss {s.z_loss:g}" if s.z_loss else "")]
    if s.kind == "ppo":
        critic = s.critic or CriticConfig()
        lines.append(f"  critic: value head initialised from {critic.model or s.reward.reward_model or 'the policy'}, "
                     f"lr {critic.optim.lr:g}, value loss x {cfg.value_coef:g}")
    lines.append(f"  weight sync: push version v+1 to the samplers after each step; parity probe every "
                 f"{s.sync.probe_every} step(s), tolerance "
                 f"{s.sync.parity_tolerance or (1e-3 if recipe.model.dtype == 'float32' else 0.25):g}"
                 + ("; samplers share the learners' resources (colocate)" if s.colocate else ""))
    lines.append(f"  outputs: {out / s.name}/checkpoints (every {s.save_every} steps, keep {s.keep_last})")
    return lines


# ----------------------------------------------------------------------- run
def run(recipe: Recipe, resume: bool = False) -> Path:
    from posttrain.cluster import local_resources, ray_session
    from posttrain.report import write_report
    from posttrain.tracking import MetricsLogger, WandbSettings

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # spares DeepSpeed's accelerator probe (and its warning)
    recipe = absolute_paths(recipe)
    out = run_dir(recipe)
    # Every check that can fail runs before anything is written under runs/.
    summary = _summary_to_continue(out, recipe, resume)
    if recipe.cluster.address == "local":
        check_recipe_resources(recipe, local_resources(recipe.cluster))
    for note in check_backends(recipe, strict=True):  # refuses a backend this environment lacks
        log.warning(note)
    ensure_model(recipe)
    for stage in recipe.stages:  # GPU placement and memory: refuses a plan that cannot fit before Ray starts
        resource_lines(recipe, stage)
    t = recipe.tracking
    wandb = WandbSettings(project=t.wandb_project, mode=t.wandb_mode, entity=t.wandb_entity) if t.wandb else None
    with ray_session(recipe.cluster, _worker_env()) as resources:
        check_recipe_resources(recipe, resources)
        _start_run_dir(out, recipe, summary)
        with MetricsLogger(out, wandb=wandb, tensorboard=t.tensorboard, run_name=recipe.name,
                           config=recipe_to_dict(recipe)) as logger:
            _run_stages(recipe, summary, out, logger, resume)
    if t.report:
        write_report(out)
    return out


def _run_stages(recipe: Recipe, summary: dict[str, Any], out: Path, logger, resume: bool) -> None:
    """Stages in order. A stage starts from its own `model`, else the last checkpoint produced before it."""
    model_path = recipe.model.path
    for i, stage in enumerate(recipe.stages):
        entry = summary["stages"][i]
        if entry["status"] == "done":
            log.info("stage %s: already done, skipped (--resume)", stage.name)
            if getattr(stage, "produces_policy", True):
                model_path = entry["checkpoint"] or model_path
            continue
        start = _resolve_model(stage.model, summary) or model_path
        entry.update(status="running", model=start, started=time.time())
        _write_summary(out, summary)
        try:
            result = _run_stage(recipe, stage, start, out, logger, resume, lambda ref: _resolve_model(ref, summary))
        except BaseException as exc:  # recorded so `summary.json` says where and why the run stopped
            entry.update(status="failed", error=str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__)
            _write_summary(out, summary)
            raise
        entry.update(status="done", metrics=result.metrics, checkpoint=result.checkpoint, details=result.details,
                     wall_time_s=round(time.time() - entry["started"], 2))
        _write_summary(out, summary)
        if getattr(stage, "produces_policy", True):  # a reward model is used by name, never as the next stage's policy
            model_path = result.checkpoint or model_path


def _resolve_model(ref: str | None, summary: dict[str, Any]) -> str | None:
    """A stage's own `model`: a path, or "@name" for the checkpoint an earlier stage produced."""
    if not ref or not ref.startswith("@"):
        return ref
    entry = next(s for s in summary["stages"] if s["name"] == ref[1:])
    if not entry.get("checkpoint"):
        raise PosttrainError(f"model {ref!r}: stage {ref[1:]!r} produced no checkpoint to start from")
    return entry["checkpoint"]


def _run_stage(recipe, stage, model_path, out, logger, resume, resolve):
    import ray

    from posttrain.stage import StageContext

    ctx = StageContext(recipe, stage, model_path, out / stage.name, logger, resume=resume, resolve=resolve)
    loop = _loops()[stage.kind]
    try:
        return loop(ctx)
    except ray.exceptions.RayActorError as exc:
        raise PosttrainError(
            f"stage {stage.name!r}: a worker process died ({_first_line(exc)}). Completed checkpoints under "
            f"{ctx.stage_dir / 'checkpoints'} are intact; fix the cause and rerun with --resume."
        ) from None
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else None
        if isinstance(cause, PosttrainError):
            raise cause from None
        raise PosttrainError(
            f"stage {stage.name!r}: a worker failed: {_first_line(cause or exc)}. Completed checkpoints under "
            f"{ctx.stage_dir / 'checkpoints'} are intact; rerun with --resume once fixed."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def _loops():
    from posttrain.loops.evaluate import run_eval
    from posttrain.loops.expert_iteration import run_rest_em
    from posttrain.loops.longctx import run_longctx_sft
    from posttrain.loops.online_rl import run_online_rl
    from posttrain.loops.preference import run_dpo
    from posttrain.loops.reward_model import run_reward_model
    from posttrain.loops.supervised import run_sft

    return {"sft": run_sft, "eval": run_eval, "rest_em": run_rest_em, "dpo": run_dpo, "reward_model": run_reward_model,
            "ppo": run_online_rl, "grpo": run_online_rl, "rloo": run_online_rl,
            "longctx_sft": run_longctx_sft}


# glibc's defaults hand freed activation buffers (MBs each) back to the kernel and map fresh pages for the next
# forward: on CPU workers every elementwise op then pays page faults (about 10k a step per learner in the GRPO
# benchmark, a tenth of its time). Keep freed memory in the heap; a user's own settings win.
GLIBC_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
                "MALLOC_TOP_PAD_": str(64 << 20)}


def _worker_env() -> dict[str, str]:
    # Quiet workers: no per-load progress bars or load reports from every actor.
    env = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning"}
    for key in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE", "WANDB_MODE", "CXX",
                "POSTTRAIN_CPU_KERNELS", "POSTTRAIN_KERNEL_CACHE"):
        if key in os.environ:
            env[key] = os.environ[key]
    for key, value in GLIBC_MALLOC.items():
        env[key] = os.environ.get(key, value)
    return env


# ------------------------------------------------------------- run directory
def _summary_to_continue(out: Path, recipe: Recipe, resume: bool) -> dict[str, Any]:
    """The run's state: fresh, or the one on disk when resuming. Read-only: refuses to touch a run that trained."""
    path = out / SUMMARY
    names = [s.name for s in recipe.stages]
    fresh = {"recipe": recipe_to_dict(recipe),
             "stages": [{"name": s.name, "kind": s.kind, "status": "pending", "metrics": {}, "checkpoint": None}
                        for s in recipe.stages]}
    if not resume:
        if path.exists():
            stages = json.loads(path.read_text())["stages"]
            if any(s["status"] != "pending" for s in stages):  # something ran: its outputs must not be overwritten
                done = [s["name"] for s in stages if s["status"] == "done"]
                raise PosttrainError(
                    f"{out} already holds a run (stages done: {', '.join(done) or 'none'}). Rerun with --resume to "
                    "continue it, or choose another name (name=... on the command line) for a new run."
                )
        return fresh
    if not path.exists():
        raise PosttrainError(f"--resume: nothing to resume at {out} (no {SUMMARY}); run without --resume")
    summary = json.loads(path.read_text())
    if [s["name"] for s in summary["stages"]] != names:
        raise PosttrainError(
            f"--resume: the recipe's stages {names} differ from the run's {[s['name'] for s in summary['stages']]}; "
            "resume with the recipe the run was started with"
        )
    summary["recipe"] = fresh["recipe"]
    return summary


def _start_run_dir(out: Path, recipe: Recipe, summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    _write_summary(out, summary)


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / SUMMARY)
