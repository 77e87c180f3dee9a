"""Preference optimisation with a DPO-family loss: offline from a pair dataset, or online rounds.

Offline: pairs -> tokens -> one reference pass (the starting weights' log-probs of every response,
computed once and saved, so a resumed run keeps the same reference) -> DeepSpeed learners.
Online (DNO / iterative-DPO style): each round samples K responses per problem from the current policy,
labels them with the data's verifier (a verified response is preferred to a failed one), and trains
with the round's starting policy as the reference.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from posttrain.algorithms.reward_augmented import augment_pair_row
from posttrain.cluster import Demand, gather, round_robin, spawn
from posttrain.data.batching import (Example, PairExample, attach_mismatched, collate_pairs, encode_example, encode_prompt,
                                     shard_pairs, step_indices)
from posttrain.data.datasets import load_split
from posttrain.errors import PosttrainError
from posttrain.loops.evaluate import policy_actors, sample, sampler_actors, verify, write_samples
from posttrain.loops.supervised import learner_group, save_step
from posttrain.models.load import load_tokenizer
from posttrain.recipe.schema import PAIR_FORMATS, DPOStage
from posttrain.stage import StageContext, StageResult
from posttrain.tracking import format_metrics, progress
from posttrain.workers.reward_model import RewardModelWorker

log = logging.getLogger(__name__)

REFERENCE_FREE = {"simpo"}


def run_dpo(ctx: StageContext) -> StageResult:
    stage: DPOStage = ctx.stage
    tok = load_tokenizer(ctx.model_path)
    if stage.online is None:
        pairs = pair_examples(ctx, tok, ctx.stage.train_split)
        return train_pairs(ctx, ctx.model_path, pairs, ctx.stage_dir, ctx.resume, tok.pad_token_id)
    return _online_rounds(ctx, tok)


# ------------------------------------------------------------------------------------------ data


def _encode_pair(tok, prompt_row: dict, chosen: str, rejected: str, max_length: int) -> PairExample | None:
    """Both responses after the same prompt tokens; None when either would be truncated (a cut pair is not a pair)."""
    c, cut_c = encode_example(tok, {**prompt_row, "completion": chosen}, max_length)
    r, cut_r = encode_example(tok, {**prompt_row, "completion": rejected}, max_length)
    if cut_c or cut_r or c.n_prompt >= len(c.input_ids) or r.n_prompt >= len(r.input_ids):
        return None
    return PairExample(c, r)


def pair_examples(ctx: StageContext, tok, split: str) -> list[PairExample]:
    """A pair dataset's split, tokenised; bad rows and over-long pairs are reported (and skipped if the stage says so)."""
    from posttrain.data.pairs import load_pairs

    stage, cfg = ctx.stage, ctx.recipe.data[ctx.stage.data]
    augmented = getattr(stage, "reward_augmented", None)
    rows, _ = load_pairs(stage.data, cfg.path, PAIR_FORMATS[cfg.format], split, max_rows=cfg.max_rows,
                         skip_bad_rows=stage.skip_bad_rows, require_scores=augmented is not None)
    if augmented is not None:
        rows = [r for row in rows for r in augment_pair_row(row, augmented.template)]
    pairs, too_long = [], []
    for row in rows:
        pair = _encode_pair(tok, {"prompt": row["prompt"], "messages": row["messages"]}, row["chosen"], row["rejected"],
                            stage.max_length)
        if pair is None:
            too_long.append(row["row"])
        else:
            pairs.append(pair)
    if too_long:
        rows_at = ", ".join(map(str, too_long[:5])) + (" ..." if len(too_long) > 5 else "")
        msg = (f"{len(too_long)} of {len(rows)} pairs of {stage.data}:{split} are longer than max_length="
               f"{stage.max_length} tokens (rows {rows_at})")
        if not stage.skip_bad_rows:
            raise PosttrainError(f"stage {stage.name!r}: {msg}; raise max_length or set skip_bad_rows: true")
        log.warning("%s: skipped %s", stage.name, msg)
    return pairs


# ------------------------------------------------------------------------------------------ training


def _reference_pass(learners, pairs: list[PairExample], mbs: int, pad_id: int, capacity: int | None) -> None:
    """Fill ref_chosen / ref_rejected with the learners' current (starting) weights, ranks in lockstep."""
    micro = [pairs[i : i + mbs] for i in range(0, len(pairs), mbs)]
    outs = round_robin(learners, "sequence_logps", [collate_pairs(mb, pad_id, capacity) for mb in micro], lockstep=True)
    for mb, logps in zip(micro, outs):  # logps: columns of len(mb): chosen, rejected (, kl)
        for j, p in enumerate(mb):
            p.set_references(logps[j :: len(mb)])


def _load_or_compute_reference(path: Path, learners, pairs, mbs, pad_id, capacity) -> None:
    if path.exists():  # a resumed run: the reference is the weights the stage started from, not the checkpoint's
        saved = json.loads(path.read_text())
        if len(saved) == len(pairs) and all(len(s) == len(p.sequences()) for s, p in zip(saved, pairs)):
            for p, logps in zip(pairs, saved):
                p.set_references(logps)
            return
    _reference_pass(learners, pairs, mbs, pad_id, capacity)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([p.references() for p in pairs]))
    tmp.replace(path)


def train_pairs(ctx: StageContext, model_path: str, pairs: list[PairExample], out_dir: Path, resume: bool,
                pad_id: int, log_prefix: str = "") -> StageResult:
    """Train `model_path` on preference pairs with the stage's loss; the reference is `model_path` itself."""
    stage: DPOStage = ctx.stage
    world, mbs = ctx.recipe.cluster.learner.actors, stage.micro_batch_size
    if len(pairs) < stage.batch_size:
        raise PosttrainError(f"stage {stage.name!r}: {len(pairs)} usable pair(s), fewer than batch_size={stage.batch_size}")
    loss_name, loss_cfg = stage.loss.name, stage.loss.build()
    capacity = stage.max_length if stage.packing else None  # every kept pair's sequences fit a row of max_length
    if loss_name == "kto":
        attach_mismatched(pairs, stage.max_length)
    xpo_alpha = stage.online.xpo_alpha if stage.online else 0.0
    live = stage.reference == "live"
    with learner_group(ctx, model_path, stage, out_dir / "checkpoints", resume, f"{len(pairs)} pairs, loss {loss_name}",
                       live_reference=live, reference_update=stage.reference_update) \
            as (learners, counts, start, resume_from):
        if loss_name not in REFERENCE_FREE and not live:
            _load_or_compute_reference(out_dir / "reference_logps.json", learners, pairs, mbs, pad_id,
                                       capacity)
        metrics: dict[str, float] = {"pairs": float(len(pairs))}
        last_ckpt = str(resume_from[0]) if resume_from else None
        bar = progress(total=stage.steps, initial=start, desc=f"{stage.name} {log_prefix}train".rstrip(), unit="step")
        window: dict[str, float] = {}
        t_log = time.perf_counter()
        for step in range(start, stage.steps):
            batch = [pairs[i] for i in step_indices(len(pairs), stage.batch_size, step, ctx.recipe.seed)]
            shards = shard_pairs(batch, world, mbs, pad_id, capacity)
            outs = gather([lr.preference_step.remote(step, shards[r], len(batch), loss_name, loss_cfg, xpo_alpha)
                           for r, lr in enumerate(learners)])
            for o in outs:
                for k, v in o.items():
                    if k not in ("lr", "grad_norm"):
                        window[k] = window.get(k, 0.0) + v
            bar.update(1)
            done = step + 1
            if done % stage.log_every == 0 or done == stage.steps:
                n = window.pop("pairs")
                row = {"loss": window.pop("loss_sum") / n, **{k: v / n for k, v in window.items()},
                       "lr": outs[0]["lr"], "grad_norm": outs[0]["grad_norm"],
                       "pairs_per_s": n / (time.perf_counter() - t_log)}
                metrics.update({f"train_{k}": v for k, v in row.items() if k in ("loss", "rewards/accuracy", "rewards/margin")})
                ctx.log(done, {f"{log_prefix}{k}": v for k, v in row.items()})
                bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margin']:.3f}")
                window, t_log = {}, time.perf_counter()
            if done % stage.save_every == 0 or done == stage.steps:
                last_ckpt = str(save_step(learners, out_dir / "checkpoints", done, stage.keep_last, world,
                                      ctx.recipe.cluster.learner.zero_stage, metrics))
        bar.close()
    return StageResult(metrics, last_ckpt, {"start_digest": counts["start_digest"]})


# ------------------------------------------------------------------------------------------ online rounds


def verified_pairs(prompt_index: list[int], texts: list[str], correct: list[bool], finished: list[bool],
                   max_per_problem: int) -> list[tuple[int, int, int]]:
    """(problem, chosen sample, rejected sample): distinct verified vs distinct failed responses, in sample order.

    Only finished samples count (a truncated response is neither a solution nor a fair negative).
    """
    good: dict[int, list[int]] = {}
    bad: dict[int, list[int]] = {}
    for i, (p, text, ok, done) in enumerate(zip(prompt_index, texts, correct, finished)):
        if not done:
            continue
        bucket = (good if ok else bad).setdefault(p, [])
        if all(texts[j] != text for j in bucket):
            bucket.append(i)
    out = []
    for p in sorted(good.keys() & bad.keys()):
        out += [(p, c, r) for c, r in zip(good[p], bad[p])][:max_per_problem]
    return out


def ranked_pairs(prompt_index: list[int], texts: list[str], scores: list[float], finished: list[bool],
                 max_per_problem: int, min_margin: float) -> list[tuple[int, int, int]]:
    """(problem, chosen sample, rejected sample) from reward-model scores: the i-th best distinct finished response
    against the i-th worst (best vs worst first), while the chosen one scores more than min_margin higher."""
    by_problem: dict[int, list[int]] = {}
    for i, (p, text, done) in enumerate(zip(prompt_index, texts, finished)):
        bucket = by_problem.setdefault(p, [])
        if done and all(texts[j] != text for j in bucket):
            bucket.append(i)
    out = []
    for p in sorted(by_problem):
        ranked = sorted(by_problem[p], key=lambda i: -scores[i])  # stable: ties keep sample order
        for k in range(min(max_per_problem, len(ranked) // 2)):
            c, r = ranked[k], ranked[-1 - k]
            if scores[c] - scores[r] <= min_margin:
                break
            out.append((p, c, r))
    return out


def _label_with_verifier(ctx, policy, rows, idx, prompts, rnd) -> tuple:
    """Sample K per problem and pair verified against failed responses. Returns (rollouts, triples, metrics)."""
    online, data = ctx.stage.online, ctx.recipe.data[ctx.stage.data]
    with policy_actors(ctx.recipe, policy, data.verifier) as (samplers, verifiers):
        roll = _sample_round(ctx, samplers, [prompts[i] for i in idx], rnd)
        answers, ids = list(rows["answer"]), list(rows["id"])  # columns once, not a Dataset lookup per problem
        verdicts = verify(verifiers, roll, [answers[i] for i in idx], [ids[i] for i in idx])
    correct = [v.correct for v in verdicts]
    write_samples(ctx.stage_dir / f"round-{rnd + 1}" / "samples.jsonl", rows.select(idx), roll, verdicts)
    triples = verified_pairs(roll.prompt_index, roll.text, correct, roll.finished, online.max_pairs_per_problem)
    return roll, triples, {"sample_pass@1": float(np.mean(correct))}


def _label_with_reward_model(ctx, policy, rows, idx, prompts, rnd) -> tuple:
    """Sample K per problem, score every response with the reward model, pair best against worst."""
    online, recipe = ctx.stage.online, ctx.recipe
    with sampler_actors(recipe, policy) as samplers:
        roll = _sample_round(ctx, samplers, [prompts[i] for i in idx], rnd)
    sub = rows.select(idx)
    texts, ids = list(sub["prompt"]), list(sub["id"])
    messages = list(sub["messages"]) if "messages" in sub.column_names else [None] * len(sub)
    prompt_rows = [{"prompt": texts[p], "messages": messages[p]} for p in roll.prompt_index]
    rm, cfg = ctx.resolve(online.reward_model), recipe.cluster.reward_model
    with spawn(RewardModelWorker, Demand("reward_model", cfg.actors, cfg.cpus, cfg.gpus),
               [(rm, recipe.model.dtype, max(1, int(cfg.cpus)), cfg.batch_size)] * cfg.actors) as scorers:
        chunks = [list(range(j, len(roll.text), len(scorers))) for j in range(len(scorers))]
        outs = gather([s.score.remote([prompt_rows[i] for i in c], [roll.text[i] for i in c])
                       for s, c in zip(scorers, chunks)])
    scores = [0.0] * len(roll.text)
    for c, out in zip(chunks, outs):
        for i, r in zip(c, out):
            scores[i] = r
    path = ctx.stage_dir / f"round-{rnd + 1}" / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for p, text, r, done in zip(roll.prompt_index, roll.text, scores, roll.finished):
            fh.write(json.dumps({"id": ids[p], "prompt": texts[p], "completion": text, "reward": r,
                                 "finished": done}) + "\n")
    triples = ranked_pairs(roll.prompt_index, roll.text, scores, roll.finished, online.max_pairs_per_problem,
                           online.min_margin)
    return roll, triples, {"sample_reward_mean": float(np.mean(scores))}


def _sample_round(ctx, samplers, prompts, rnd):
    online = ctx.stage.online
    return sample(samplers, prompts, online.samples_per_problem, online.sampling, ctx.recipe.cluster.sampler.batch_size,
                  f"{ctx.stage.name} round {rnd + 1} sample", seed=ctx.recipe.seed + 7919 * (rnd + 1))


def _online_rounds(ctx: StageContext, tok) -> StageResult:
    stage: DPOStage = ctx.stage
    online = stage.online
    cfg = ctx.recipe.data[stage.data]
    if cfg.format in PAIR_FORMATS:  # a pair dataset's prompts (their responses are not used): reward-model labels
        from posttrain.data.pairs import load_pairs

        rows, _ = load_pairs(stage.data, cfg.path, PAIR_FORMATS[cfg.format], stage.train_split, max_rows=cfg.max_rows,
                             skip_bad_rows=True)
    else:
        rows = load_split(stage.data, cfg, stage.train_split)
    prompts = [encode_prompt(tok, r) for r in rows]
    label = _label_with_reward_model if online.label == "reward_model" else _label_with_verifier
    table_path = ctx.stage_dir / "rounds.json"
    table: list[dict] = json.loads(table_path.read_text()) if ctx.resume and table_path.exists() else []
    policy = table[-1]["checkpoint"] if table else ctx.model_path
    for rnd in range(len(table), online.rounds):
        t0 = time.perf_counter()
        idx = list(range(len(rows)))
        if online.problems_per_round is not None and online.problems_per_round < len(rows):
            idx = sorted(np.random.default_rng([ctx.recipe.seed, rnd]).choice(len(rows), online.problems_per_round,
                                                                                replace=False).tolist())
        roll, triples, label_metrics = label(ctx, policy, rows, idx, prompts, rnd)
        pairs = []
        for p, c, r in triples:  # completion tokens exactly as sampled (no re-tokenisation of the text)
            prompt = list(prompts[idx[p]])
            if len(prompt) + max(len(roll.completion_ids[c]), len(roll.completion_ids[r])) <= stage.max_length:
                pairs.append(PairExample(Example(prompt + roll.completion_ids[c], len(prompt)),
                                         Example(prompt + roll.completion_ids[r], len(prompt))))
        if len(pairs) < len(triples):
            log.warning("%s round %d: %d of %d pairs are longer than max_length=%d and were left out", stage.name,
                        rnd + 1, len(triples) - len(pairs), len(triples), stage.max_length)
        row = {"round": rnd + 1, **label_metrics, "pairs": len(pairs),
               "problems_with_pairs": len({p for p, _, _ in triples})}
        log.info("%s round %d: %s", stage.name, rnd + 1, format_metrics(row))
        result = train_pairs(ctx, policy, pairs, ctx.stage_dir / f"round-{rnd + 1}", resume=False,
                             pad_id=tok.pad_token_id, log_prefix=f"round{rnd + 1}/")
        policy = result.checkpoint
        row.update({**{k: v for k, v in result.metrics.items() if k.startswith("train_")}, "checkpoint": policy,
                    "wall_s": round(time.perf_counter() - t0, 1)})
        table.append(row)
        tmp = table_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=2))
        tmp.replace(table_path)
        ctx.log(rnd + 1, {k: v for k, v in row.items() if isinstance(v, (int, float))})
    final = table[-1]
    metrics = {k: float(v) for k, v in final.items()
               if k.startswith(("train_", "sample_")) or k == "pairs"}
    return StageResult(metrics, policy, {"rounds": table})
