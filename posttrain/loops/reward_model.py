"""Reward model stage: Bradley-Terry on preference pairs, with held-out pairwise accuracy.

pairs -> tokens -> learners (the policy's network with a new scalar head) -> checkpoints in Hugging Face
sequence-classification format, which RewardModelWorker (and transformers / vLLM) load.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from posttrain.algorithms.reward_model import RewardModelConfig
from posttrain.cluster import gather, round_robin
from posttrain.data.batching import PairExample, collate_pair_rows, deal_pairs, step_indices
from posttrain.errors import PosttrainError
from posttrain.loops.preference import pair_examples
from posttrain.loops.supervised import learner_group, save_step
from posttrain.models.load import load_tokenizer
from posttrain.recipe.schema import RewardModelStage
from posttrain.stage import StageContext, StageResult
from posttrain.tracking import progress

log = logging.getLogger(__name__)


def run_reward_model(ctx: StageContext) -> StageResult:
    stage: RewardModelStage = ctx.stage
    world, mbs = ctx.recipe.cluster.learner.actors, stage.micro_batch_size
    tok = load_tokenizer(ctx.model_path)
    train = pair_examples(ctx, tok, stage.train_split)
    if stage.eval_split:
        held_out = pair_examples(ctx, tok, stage.eval_split)
    else:
        train, held_out = hold_out(train, stage.eval_fraction, ctx.recipe.seed)
    usable = len(held_out) // (world * mbs) * (world * mbs)  # ZeRO-3 ranks run forwards in lockstep
    if held_out and not usable:
        log.warning("%s: %d held-out pair(s) are fewer than one forward on every learner (%d x %d): no held-out "
                    "accuracy; hold out more pairs", stage.name, len(held_out), world, mbs)
    held_out = held_out[:usable]
    if len(train) < stage.batch_size:
        raise PosttrainError(f"stage {stage.name!r}: {len(train)} usable training pair(s), fewer than "
                             f"batch_size={stage.batch_size}")
    cfg = RewardModelConfig(center_coefficient=stage.center_coefficient)
    pad_id = tok.pad_token_id
    ckpt_root = ctx.stage_dir / "checkpoints"
    with learner_group(ctx, ctx.model_path, stage, ckpt_root, ctx.resume,
                       f"{len(train)} training pairs, {len(held_out)} held out", head="reward") \
            as (learners, counts, start, resume_from):
        metrics: dict[str, float] = {"train_pairs": float(len(train)), "eval_pairs": float(len(held_out))}
        last_ckpt = str(resume_from[0]) if resume_from else None
        bar = progress(total=stage.steps, initial=start, desc=f"{stage.name} train", unit="step")
        window: dict[str, float] = {}
        t_log = time.perf_counter()
        for step in range(start, stage.steps):
            batch = [train[i] for i in step_indices(len(train), stage.batch_size, step, ctx.recipe.seed)]
            shards = [[collate_pair_rows(mb, pad_id) for mb in rank] for rank in deal_pairs(batch, world, mbs)]
            outs = gather([lr.reward_step.remote(step, shards[r], len(batch), cfg) for r, lr in enumerate(learners)])
            for o in outs:
                for k in ("loss", "accuracy", "margin", "pairs"):
                    window[k] = window.get(k, 0.0) + o[k]
            bar.update(1)
            done = step + 1
            if done % stage.log_every == 0 or done == stage.steps:
                n = window.pop("pairs")
                row = {f"train_{k}": v / n for k, v in window.items()}
                row.update(lr=outs[0]["lr"], grad_norm=outs[0]["grad_norm"],
                           pairs_per_s=n / (time.perf_counter() - t_log))
                metrics.update({k: v for k, v in row.items() if k.startswith("train_")})
                ctx.log(done, row)
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", acc=f"{row['train_accuracy']:.2f}")
                window, t_log = {}, time.perf_counter()
            if held_out and (done % stage.eval_every == 0 or done == stage.steps):
                metrics.update(held_out_accuracy(learners, held_out, mbs, pad_id))
                ctx.log(done, {k: metrics[k] for k in ("eval_accuracy", "eval_margin")})
                log.info("%s step %d: held-out pairwise accuracy %.3f on %d pairs", stage.name, done,
                         metrics["eval_accuracy"], len(held_out))
            if done % stage.save_every == 0 or done == stage.steps:
                last_ckpt = str(save_step(learners, ckpt_root, done, stage.keep_last, world,
                                          ctx.recipe.cluster.learner.zero_stage, metrics))
        bar.close()
    return StageResult(metrics, last_ckpt, {"start_digest": counts["start_digest"]})


def hold_out(pairs: list[PairExample], fraction: float, seed: int) -> tuple[list[PairExample], list[PairExample]]:
    """A seeded random `fraction` of the pairs (at least one when fraction > 0) held out for evaluation."""
    if fraction <= 0 or len(pairs) < 2:
        return pairs, []
    perm = np.random.default_rng([seed, 17]).permutation(len(pairs))
    n = max(1, int(round(fraction * len(pairs))))
    held = set(perm[:n].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def held_out_accuracy(learners, pairs: list[PairExample], mbs: int, pad_id: int) -> dict[str, float]:
    """Pairwise accuracy (ties count half) and mean reward margin over held-out pairs."""
    from posttrain.algorithms.reward_model import pairwise_accuracy

    import torch

    micro = [pairs[i : i + mbs] for i in range(0, len(pairs), mbs)]  # the caller keeps a multiple of world x mbs
    outs = round_robin(learners, "rewards", [collate_pair_rows(mb, pad_id) for mb in micro])
    chosen, rejected = [], []
    for mb, r in zip(micro, outs):
        chosen += r[: len(mb)]
        rejected += r[len(mb) :]
    rc, rr = torch.tensor(chosen), torch.tensor(rejected)
    return {"eval_accuracy": pairwise_accuracy(rc, rr), "eval_margin": (rc - rr).mean().item() if len(rc) else math.nan}
