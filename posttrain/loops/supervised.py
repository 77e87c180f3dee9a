"""SFT: rows -> tokenised examples -> DeepSpeed learners, with held-out loss and atomic checkpoints."""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import ray

from posttrain import checkpoint
from posttrain.cluster import Demand, gather, spawn
from posttrain.data.batching import Example, encode_example, micro_batches, shard_step, step_indices
from posttrain.data.datasets import load_split
from posttrain.errors import PosttrainError
from posttrain.models.load import load_tokenizer
from posttrain.recipe.schema import SFTStage
from posttrain.stage import StageContext, StageResult
from posttrain.tracking import progress
from posttrain.workers.learner import LearnerSpec, LearnerWorker

log = logging.getLogger(__name__)


def run_sft(ctx: StageContext) -> StageResult:
    stage: SFTStage = ctx.stage
    world, mbs = ctx.recipe.cluster.learner.actors, stage.micro_batch_size
    tok = load_tokenizer(ctx.model_path)
    train = _encode_split(ctx, stage.train_split, tok)
    held_out = _encode_split(ctx, stage.eval_split, tok)[: stage.eval_rows] if stage.eval_split else []
    held_out = held_out[: len(held_out) // (world * mbs) * (world * mbs)]  # ZeRO-3 ranks run forwards in lockstep
    return train_examples(ctx, ctx.model_path, train, held_out, stage, ctx.stage_dir / "checkpoints",
                          resume=ctx.resume, pad_id=tok.pad_token_id)


def train_examples(ctx: StageContext, model_path: str, train: list[Example], held_out: list[Example], plan,
                   ckpt_root: Path, resume: bool, pad_id: int, log_prefix: str = "") -> StageResult:
    """Fine-tune `model_path` on tokenised examples with the learner group; returns metrics and the last checkpoint.

    `plan` carries the training knobs (an SFTStage, or ReST-EM's M-step config): steps, batch_size,
    micro_batch_size, optim, log_every, and optionally eval_every/save_every/keep_last.
    """
    recipe, lcfg = ctx.recipe, ctx.recipe.cluster.learner
    world, mbs = lcfg.actors, plan.micro_batch_size
    steps = plan.steps
    eval_every = getattr(plan, "eval_every", steps)
    save_every = getattr(plan, "save_every", steps)
    keep_last = getattr(plan, "keep_last", 1)
    if not train:
        raise PosttrainError(f"stage {ctx.stage.name!r}: nothing to train on")
    with learner_group(ctx, model_path, plan, ckpt_root, resume, f"{len(train)} examples") as (learners, counts, start, resume_from):
        metrics: dict[str, float] = {"trainable_params": float(counts["trainable"])}
        last_ckpt = str(resume_from[0]) if resume_from else None
        bar = progress(total=steps, initial=start, desc=f"{ctx.stage.name} {log_prefix}train".rstrip(), unit="step")
        window: list[tuple[float, float]] = []  # (nll_sum, tokens) since the last log line
        t_log = time.perf_counter()
        for step in range(start, steps):
            batch = [train[i] for i in step_indices(len(train), plan.batch_size, step, recipe.seed)]
            shards = shard_step(batch, world, mbs, pad_id)
            tokens = sum(mb.n_target_tokens for rank in shards for mb in rank)
            outs = gather([lr.train_step.remote(step, shards[r], tokens) for r, lr in enumerate(learners)])
            window.append((sum(o["nll_sum"] for o in outs), tokens))
            bar.update(1)
            done = step + 1
            if done % plan.log_every == 0 or done == steps:
                nll, n = map(sum, zip(*window))
                dt = time.perf_counter() - t_log
                metrics["train_loss"] = nll / n
                ctx.log(done, {f"{log_prefix}train_loss": nll / n, f"{log_prefix}lr": outs[0]["lr"],
                               f"{log_prefix}grad_norm": outs[0]["grad_norm"], f"{log_prefix}tokens_per_s": n / dt})
                bar.set_postfix(loss=f"{nll / n:.4f}")
                window, t_log = [], time.perf_counter()
            if held_out and (done % eval_every == 0 or done == steps):
                metrics["eval_loss"] = _held_out_loss(learners, held_out, world, mbs, pad_id)
                ctx.log(done, {f"{log_prefix}eval_loss": metrics["eval_loss"]})
            if done % save_every == 0 or done == steps:
                last_ckpt = str(save_step(learners, ckpt_root, done, keep_last, world, lcfg.zero_stage, metrics))
        bar.close()
    return StageResult(metrics, last_ckpt, {"start_digest": counts["start_digest"]})


@contextmanager
def learner_group(ctx: StageContext, model_path: str, plan, ckpt_root: Path, resume: bool, what: str,
                  demand: Demand | None = None, **spec_extra):
    """The learner actors for one training run, set up and (when resuming) restored from the last checkpoint.

    Yields (learners, parameter counts, first step, (path, state) resumed from or None); the actors are
    removed on exit. `plan` carries steps, batch_size, micro_batch_size and optim; `spec_extra` sets or
    overrides LearnerSpec fields (head, live_reference, reference_update, total_steps, ...); `demand`: what
    each actor reserves (default: cluster.learner's own share).
    """
    recipe, lcfg = ctx.recipe, ctx.recipe.cluster.learner
    world, mbs = lcfg.actors, plan.micro_batch_size
    resume_from = checkpoint.latest(ckpt_root) if resume else None
    spec = LearnerSpec(**{
        "model_path": model_path, "dtype": recipe.model.dtype, "lora": recipe.model.lora, "optim": plan.optim,
        "total_steps": plan.steps, "micro_batches_per_step": plan.batch_size // (world * mbs), "micro_batch_size": mbs,
        "backend": lcfg.backend, "zero_stage": lcfg.zero_stage, "seed": recipe.seed, "threads": max(1, int(lcfg.cpus)),
        **spec_extra})
    group = spawn(LearnerWorker, demand or Demand("learner", world, lcfg.cpus, lcfg.gpus),
                  [(rank, world, spec) for rank in range(world)], pack=True)
    with group as learners:
        addr, port = ray.get(learners[0].address.remote())
        counts = gather([lr.setup.remote(addr, port) for lr in learners])[0]
        log.info("%s: %d learner(s), ZeRO-%d, %s params (%s trainable), %s", ctx.stage.name, world,
                 lcfg.zero_stage, f"{counts['params']:,}", f"{counts['trainable']:,}", what)
        start = 0
        if resume_from is not None:
            path, state = resume_from
            _check_same_layout(state, world, lcfg.zero_stage, path)
            gather([lr.load.remote(str(path)) for lr in learners])
            start = state["step"]
            log.info("%s: resumed from %s (step %d)", ctx.stage.name, path, start)
        yield learners, counts, start, resume_from


def _encode_split(ctx: StageContext, split: str, tok) -> list:
    stage = ctx.stage
    return encode_sft_split(stage.name, stage.data, ctx.recipe.data[stage.data], split, tok, stage.max_length)


def encode_sft_split(stage: str, data: str, cfg, split: str, tok, max_length: int) -> list[Example]:
    """A prompt/completion split tokenised for a language-model loss on the completions (SFT, PPO-ptx)."""
    rows = load_split(data, cfg, split)
    if len(rows) == 0:
        raise PosttrainError(f"stage {stage!r}: data {data}:{split} is empty")
    if "completion" not in rows.column_names or any(c is None for c in rows["completion"]):
        raise PosttrainError(f"stage {stage!r}: data {data}:{split} has rows without a completion; "
                             "a language-model loss needs prompt/completion pairs (or messages ending with an "
                             "assistant turn)")
    encoded = [encode_example(tok, row, max_length) for row in rows]
    truncated = sum(t for _, t in encoded)
    if truncated:
        log.warning("stage %s: %d of %d rows of %s:%s were truncated to max_length=%d",
                    stage, truncated, len(encoded), data, split, max_length)
    return [e for e, _ in encoded]


def _held_out_loss(learners, examples, world, mbs, pad_id) -> float:
    batches = micro_batches(examples, mbs, pad_id)
    outs = gather([lr.eval_loss.remote(batches[r::world]) for r, lr in enumerate(learners)])
    nll, n = map(sum, zip(*outs))
    return nll / n if n else math.nan


def save_step(learners, root, step, keep_last, world, zero_stage, metrics, write_extra=None) -> Path:
    """An atomic checkpoint of the learners; write_extra(tmp_dir) adds files before it is committed."""
    tmp = checkpoint.begin(root, step)
    gather([lr.save.remote(str(tmp)) for lr in learners])
    if write_extra is not None:
        write_extra(tmp)
    state = {"step": step, "world_size": world, "zero_stage": zero_stage, "metrics": metrics}
    return checkpoint.commit(tmp, state, keep_last)


def _check_same_layout(state: dict, world: int, zero_stage: int, path) -> None:
    if state.get("world_size") != world or state.get("zero_stage") != zero_stage:
        raise PosttrainError(
            f"cannot resume from {path}: it was written by {state.get('world_size')} learner(s) with ZeRO-"
            f"{state.get('zero_stage')}, this run has {world} with ZeRO-{zero_stage}. Use the same "
            "cluster.learner.actors and zero_stage to resume."
        )
