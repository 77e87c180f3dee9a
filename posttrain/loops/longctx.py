"""longctx_sft: train a selective SSM on long documents with adjoint gradients, in the driver or sharded over Ray.

One step: a deterministic batch of documents -> the gradient engine (exact or truncated adjoint, autograd,
checkpointing; `gradient.workers` > 0 splits the adjoint's VJPs across Ray workers) -> clipped AdamW. Held-out answer
accuracy (the labelled token predicted by argmax) is measured every `eval_every` steps, overall and by how far the
fact travelled; checkpoints are Hugging Face directories plus the optimizer state, and resume continues the same run.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

import torch

from posttrain import checkpoint
from posttrain.cluster import Demand, spawn
from posttrain.data.batching import step_indices
from posttrain.data.datasets import load_split
from posttrain.data.tasks.kv_recall import IGNORE
from posttrain.errors import PosttrainError
from posttrain.longctx.adjoint import Engine, loss_and_grad
from posttrain.longctx.sharded import AdjointShard, shard_args, sharded_loss_and_grad
from posttrain.longctx.ssm import load_ssm
from posttrain.optim import lr_multiplier
from posttrain.recipe.schema import LongCtxSFTStage
from posttrain.stage import StageContext, StageResult
from posttrain.tracking import format_metrics, progress

log = logging.getLogger(__name__)
OPTIMIZER_FILE = "optimizer.pt"


def run_longctx_sft(ctx: StageContext) -> StageResult:
    stage: LongCtxSFTStage = ctx.stage
    g = stage.gradient
    engine = Engine(g.engine, g.window, g.chunk, g.cotangent)
    root = ctx.stage_dir / "checkpoints"
    found = checkpoint.latest(root) if ctx.resume else None
    model = load_ssm(found[0] if found else ctx.model_path, ctx.recipe.model.dtype)
    train_ids, train_labels, _ = _documents(ctx, stage.train_split)
    held_out = _documents(ctx, stage.eval_split, stage.eval_rows) if stage.eval_split else None
    if int(train_ids.max()) >= model.config.vocab_size:
        raise PosttrainError(f"stage {stage.name!r}: data {stage.data} uses token ids up to {int(train_ids.max())} but "
                             f"the model's vocab_size is {model.config.vocab_size}: raise model.ssm.vocab_size")
    o = stage.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    start, metrics, last_ckpt = 0, {}, None
    if found is not None:
        path, state = found
        opt.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
        start, metrics, last_ckpt = state["step"], state.get("metrics", {}), str(path)
        log.info("%s: resumed from %s (step %d)", stage.name, path, start)
    T = train_ids.shape[1]
    log.info("%s: %s params, %d documents of %d tokens, %s engine%s%s", stage.name,
             f"{sum(p.numel() for p in model.parameters()):,}", len(train_ids), T, engine.kind,
             f", window {engine.window}" if engine.window else "", f", {g.workers} Ray workers by {g.split}" if g.workers else "")
    if held_out is not None and start == 0:
        metrics.update(answer_accuracy(model, *held_out))
        ctx.log(0, {k: v for k, v in metrics.items() if k.startswith("accuracy")})
        log.info("%s step 0: %s", stage.name, format_metrics(metrics))
    with _shards(model, g) as shards:
        bar = progress(total=stage.steps, initial=start, desc=f"{stage.name} train", unit="step")
        window_loss, t_log = [], time.perf_counter()
        for step in range(start, stage.steps):
            idx = torch.tensor(step_indices(len(train_ids), stage.batch_size, step, ctx.recipe.seed))
            ids, labels = train_ids[idx], train_labels[idx]
            result = (sharded_loss_and_grad(model, ids, labels, engine, shards, g.split) if shards
                      else loss_and_grad(model, ids, labels, engine))
            if not math.isfinite(result.loss):
                raise PosttrainError(f"stage {stage.name!r} step {step + 1}: the loss is {result.loss}; the last "
                                     f"checkpoint ({last_ckpt or 'none yet'}) is intact: lower optim.lr and --resume")
            grad_norm = _clip(model, o.grad_clip)
            lr = o.lr * lr_multiplier(step, stage.steps, o.warmup_steps, o.schedule, o.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            window_loss.append(result.loss)
            bar.update(1)
            done = step + 1
            if done % stage.log_every == 0 or done == stage.steps:
                dt = time.perf_counter() - t_log
                metrics["train_loss"] = sum(window_loss) / len(window_loss)
                ctx.log(done, {"train_loss": metrics["train_loss"], "lr": lr, "grad_norm": grad_norm,
                               "step_s": dt / len(window_loss),
                               "tokens_per_s": len(window_loss) * stage.batch_size * T / dt})
                bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
                window_loss, t_log = [], time.perf_counter()
            if held_out is not None and (done % stage.eval_every == 0 or done == stage.steps):
                scores = answer_accuracy(model, *held_out)
                metrics.update(scores)
                ctx.log(done, scores)
                log.info("%s step %d: %s", stage.name, done, format_metrics(scores))
                t_log = time.perf_counter()  # eval time is not training throughput
            if done % stage.save_every == 0 or done == stage.steps:
                last_ckpt = str(_save(model, opt, root, done, stage.keep_last, metrics))
        bar.close()
    if held_out is not None:
        metrics["chance"] = 1.0 / _n_answers(ctx)
    return StageResult(metrics, last_ckpt, {"engine": engine.kind, "window": engine.window, "seq_len": T})


def _documents(ctx: StageContext, split: str, limit: int | None = None):
    stage = ctx.stage
    rows = load_split(stage.data, ctx.recipe.data[stage.data], split)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    if len(rows) == 0:
        raise PosttrainError(f"stage {stage.name!r}: data {stage.data}:{split} is empty")
    ids, labels = torch.tensor(rows["input_ids"]), torch.tensor(rows["labels"])
    distance = torch.tensor(rows["distance"]) if "distance" in rows.column_names else None
    return ids, labels, distance


def _n_answers(ctx: StageContext) -> int:
    return ctx.recipe.data[ctx.stage.data].kv_recall.n_values


@torch.no_grad()
def answer_accuracy(model, ids: torch.Tensor, labels: torch.Tensor, distance: torch.Tensor | None,
                    batch: int = 32) -> dict[str, float]:
    """Argmax accuracy on every labelled token, overall and per third of the distance range the fact travelled."""
    correct = []
    for s in range(0, len(ids), batch):
        logits = model(ids[s: s + batch]).logits[:, :-1]
        target = labels[s: s + batch, 1:]
        hit = (logits.argmax(-1) == target) | (target == IGNORE)
        correct.append(hit.all(dim=1).float())
    correct_t = torch.cat(correct)
    out = {"accuracy": correct_t.mean().item()}
    if distance is not None and distance.max() > distance.min():
        edges = torch.quantile(distance.float(), torch.tensor([1 / 3, 2 / 3]))
        bucket = torch.bucketize(distance.float(), edges)
        for b, name in enumerate(("near", "mid", "far")):
            if (bucket == b).any():
                out[f"accuracy_{name}"] = correct_t[bucket == b].mean().item()
    return out


def _clip(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


def _save(model, opt, root, step: int, keep_last: int, metrics: dict):
    tmp = checkpoint.begin(root, step)
    model.save_pretrained(tmp)
    torch.save(opt.state_dict(), tmp / OPTIMIZER_FILE)
    return checkpoint.commit(tmp, {"step": step, "metrics": metrics}, keep_last)


@contextmanager
def _shards(model, g):
    """The Ray workers of a sharded engine (none when gradient.workers is 0), removed when the stage ends."""
    if not g.workers:
        yield None
        return
    args = shard_args(model, g.workers, g.split)
    with spawn(AdjointShard, Demand("adjoint_shard", len(args), 1.0, 0.0), args) as shards:
        yield shards
