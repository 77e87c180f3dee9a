"""SFT: rows -> tokenised examples -> DeepSpeed learners, with held-out loss and atomic checkpoints."""

from __future__ import annotations

import logging
import math
import time

import ray

from posttrain import checkpoint
from posttrain.cluster import Demand, gather, spawn
from posttrain.data.batching import encode_example, micro_batches, shard_step, step_indices
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
    recipe, lcfg = ctx.recipe, ctx.recipe.cluster.learner
    world, mbs = lcfg.actors, stage.micro_batch_size
    gas = stage.batch_size // (world * mbs)

    tok = load_tokenizer(ctx.model_path)
    train = _encode_split(ctx, stage.train_split, tok)
    held_out = _encode_split(ctx, stage.eval_split, tok)[: stage.eval_rows] if stage.eval_split else []
    held_out = held_out[: len(held_out) // (world * mbs) * (world * mbs)]  # ZeRO-3 ranks run forwards in lockstep

    ckpt_root = ctx.stage_dir / "checkpoints"
    resume_from = checkpoint.latest(ckpt_root) if ctx.resume else None
    spec = LearnerSpec(
        model_path=ctx.model_path, dtype=recipe.model.dtype, lora=recipe.model.lora, optim=stage.optim,
        total_steps=stage.steps, micro_batches_per_step=gas, micro_batch_size=mbs, backend=lcfg.backend,
        zero_stage=lcfg.zero_stage, seed=recipe.seed, threads=max(1, int(lcfg.cpus)),
    )
    group = spawn(LearnerWorker, Demand("learner", world, lcfg.cpus, lcfg.gpus),
                  [(rank, world, spec) for rank in range(world)], pack=True)
    with group as learners:
        addr, port = ray.get(learners[0].address.remote())
        counts = gather([lr.setup.remote(addr, port) for lr in learners])[0]
        log.info("sft: %d learner(s), ZeRO-%d, %s params (%s trainable)", world, lcfg.zero_stage,
                 f"{counts['params']:,}", f"{counts['trainable']:,}")
        start = 0
        if resume_from is not None:
            path, state = resume_from
            _check_same_layout(state, world, lcfg.zero_stage, path)
            gather([lr.load.remote(str(path)) for lr in learners])
            start = state["step"]
            log.info("sft: resumed from %s (step %d)", path, start)

        metrics: dict[str, float] = {"trainable_params": float(counts["trainable"])}
        last_ckpt = str(resume_from[0]) if resume_from else None
        bar = progress(total=stage.steps, initial=start, desc=f"{stage.name} train", unit="step")
        window: list[tuple[float, float]] = []  # (nll_sum, tokens) since the last log line
        t_log = time.perf_counter()
        for step in range(start, stage.steps):
            batch = [train[i] for i in step_indices(len(train), stage.batch_size, step, recipe.seed)]
            shards = shard_step(batch, world, mbs, tok.pad_token_id)
            tokens = sum(mb.n_target_tokens for rank in shards for mb in rank)
            outs = gather([lr.train_step.remote(step, shards[r], tokens) for r, lr in enumerate(learners)])
            window.append((sum(o["nll_sum"] for o in outs), tokens))
            bar.update(1)
            done = step + 1
            if done % stage.log_every == 0 or done == stage.steps:
                nll, n = map(sum, zip(*window))
                dt = time.perf_counter() - t_log
                metrics["train_loss"] = nll / n
                ctx.log(done, {"train_loss": nll / n, "lr": outs[0]["lr"], "grad_norm": outs[0]["grad_norm"],
                               "tokens_per_s": n / dt})
                bar.set_postfix(loss=f"{nll / n:.4f}")
                window, t_log = [], time.perf_counter()
            if held_out and (done % stage.eval_every == 0 or done == stage.steps):
                metrics["eval_loss"] = _held_out_loss(learners, held_out, world, mbs, tok.pad_token_id)
                ctx.log(done, {"eval_loss": metrics["eval_loss"]})
            if done % stage.save_every == 0 or done == stage.steps:
                last_ckpt = str(_save(learners, ckpt_root, done, stage, world, lcfg.zero_stage, metrics))
        bar.close()
    return StageResult(metrics, last_ckpt)


def _encode_split(ctx: StageContext, split: str, tok) -> list:
    stage = ctx.stage
    rows = load_split(stage.data, ctx.recipe.data[stage.data], split)
    if len(rows) == 0:
        raise PosttrainError(f"stage {stage.name!r}: data {stage.data}:{split} is empty")
    if "completion" not in rows.column_names or any(c is None for c in rows["completion"]):
        raise PosttrainError(f"stage {stage.name!r}: data {stage.data}:{split} has rows without a completion; "
                             "SFT needs prompt/completion pairs (or messages ending with an assistant turn)")
    encoded = [encode_example(tok, row, stage.max_length) for row in rows]
    truncated = sum(t for _, t in encoded)
    if truncated:
        log.warning("stage %s: %d of %d rows of %s:%s were truncated to max_length=%d",
                    stage.name, truncated, len(encoded), stage.data, split, stage.max_length)
    return [e for e, _ in encoded]


def _held_out_loss(learners, examples, world, mbs, pad_id) -> float:
    batches = micro_batches(examples, mbs, pad_id)
    outs = gather([lr.eval_loss.remote(batches[r::world]) for r, lr in enumerate(learners)])
    nll, n = map(sum, zip(*outs))
    return nll / n if n else math.nan


def _save(learners, root, step, stage, world, zero_stage, metrics) -> object:
    tmp = checkpoint.begin(root, step)
    gather([lr.save.remote(str(tmp)) for lr in learners])
    state = {"step": step, "world_size": world, "zero_stage": zero_stage, "metrics": metrics}
    return checkpoint.commit(tmp, state, stage.keep_last)


def _check_same_layout(state: dict, world: int, zero_stage: int, path) -> None:
    if state.get("world_size") != world or state.get("zero_stage") != zero_stage:
        raise PosttrainError(
            f"cannot resume from {path}: it was written by {state.get('world_size')} learner(s) with ZeRO-"
            f"{state.get('zero_stage')}, this run has {world} with ZeRO-{zero_stage}. Use the same "
            "cluster.learner.actors and zero_stage to resume."
        )
