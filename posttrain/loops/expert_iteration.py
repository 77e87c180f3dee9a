"""ReST-EM (Singh et al. 2023): E-step sample + verify + filter, M-step fine-tune from base, evaluate, repeat.

Each iterate gets one sampler group: it is evaluated on the held-out split, then (unless it is the
last) samples K solutions per training problem. Iteration 0 is the stage's input model. The
per-iteration table (test pass@1, pass@K, maj@K; kept samples, problems solved) goes to
summary.json and report.html; `iterations.json` in the stage directory lets --resume continue
after the last finished iteration.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from posttrain.algorithms.rest_em import select_verified
from posttrain.data.batching import Example, encode_prompt
from posttrain.data.datasets import load_split
from posttrain.errors import PosttrainError
from posttrain.loops.evaluate import evaluate_policy, policy_actors, sample, verify, write_samples
from posttrain.loops.supervised import train_examples
from posttrain.models.load import load_tokenizer
from posttrain.recipe.schema import RestEMStage
from posttrain.scoring import maj_at_k
from posttrain.stage import StageContext, StageResult
from posttrain.tracking import format_metrics
from posttrain.verifiers import answer_equal, votes

log = logging.getLogger(__name__)
TABLE = "iterations.json"


def run_rest_em(ctx: StageContext) -> StageResult:
    stage: RestEMStage = ctx.stage
    data_cfg = ctx.recipe.data[stage.data]
    tok = load_tokenizer(ctx.model_path)
    pool = load_split(stage.data, data_cfg, stage.train_split)
    if len(pool) == 0 or any(a is None for a in pool["answer"]):
        raise PosttrainError(f"stage {stage.name!r}: {stage.data}:{stage.train_split} needs rows with an `answer`")
    pool_prompts = [encode_prompt(tok, row) for row in pool]
    pool_answers, pool_ids = list(pool["answer"]), list(pool["id"])
    eval_name = stage.eval_data or stage.data
    test = load_split(eval_name, ctx.recipe.data[eval_name], stage.eval_split) if stage.eval_split else None
    if test is not None and stage.eval_max_problems:
        test = test.select(range(min(stage.eval_max_problems, len(test))))
    test_prompts = [encode_prompt(tok, row) for row in test] if test is not None else []

    base, table = ctx.model_path, _load_table(ctx) if ctx.resume else []
    policy = table[-1]["checkpoint"] if table else base
    batch, seed = ctx.recipe.cluster.sampler.batch_size, ctx.recipe.seed
    for it in range(len(table), stage.iterations + 1):  # iteration 0 is the input model; the last one only evaluates
        t0 = time.perf_counter()
        row: dict = {"iteration": it}
        with policy_actors(ctx.recipe, policy, data_cfg.verifier) as (samplers, verifiers):
            if test is not None:
                m = evaluate_policy(samplers, verifiers, test, test_prompts, verifier_name=ctx.recipe.data[eval_name].verifier,
                                    greedy_tokens=stage.eval_sampling.max_new_tokens, samples=stage.eval_samples,
                                    pass_k=sorted({1, stage.eval_samples}) if stage.eval_samples else [],
                                    sampling=stage.eval_sampling, batch_size=batch, seed=seed,
                                    desc=f"{stage.name} eval it{it}")
                row.update({f"test_{k}": v for k, v in m.items() if k != "problems"})
            if it < stage.iterations:  # E-step: K samples per problem from the current policy, verified
                idx = _problems_for(it, len(pool), stage.problems_per_iteration, seed)
                roll = sample(samplers, [pool_prompts[i] for i in idx], stage.samples_per_problem, stage.sampling,
                              batch, f"{stage.name} E-step {it + 1}", seed=seed + 7919 * (it + 1))
                verdicts = verify(verifiers, roll, [pool_answers[i] for i in idx], [pool_ids[i] for i in idx])
        if it < stage.iterations:
            examples = _kept_examples(ctx, it, row, pool.select(idx), [pool_prompts[i] for i in idx], roll, verdicts)
            # M-step: the paper fine-tunes the base model every iteration (less overfitting, better transfer).
            start = base if stage.from_base else policy
            result = train_examples(ctx, start, examples, [], stage.m_step, ctx.stage_dir / f"iter-{it + 1}" / "checkpoints",
                                    resume=False, pad_id=tok.pad_token_id, log_prefix=f"iter{it + 1}/")
            policy = result.checkpoint
            row.update({"m_step_loss": result.metrics.get("train_loss"), "m_step_start": start,
                        "m_step_start_digest": result.details["start_digest"]})
        row.update({"checkpoint": policy, "wall_s": round(time.perf_counter() - t0, 1)})
        table.append(row)
        _save_table(ctx, table)
        _log_row(ctx, row)

    final = table[-1]
    metrics = {k: v for k, v in final.items() if k.startswith("test_") and isinstance(v, float)}
    if "test_pass@1" in table[0] and "test_pass@1" in final:
        metrics["test_pass@1_gain"] = final["test_pass@1"] - table[0]["test_pass@1"]
    metrics["kept_total"] = float(sum(r.get("kept", 0) for r in table))
    return StageResult(metrics, policy, {"iterations": table})


def _kept_examples(ctx: StageContext, it: int, row: dict, rows, prompts: list[list[int]], roll, verdicts) -> list[Example]:
    """The E-step's filter: verified, finished, de-duplicated and capped samples as training examples.

    Records the iteration's E-step statistics in `row` and every sample (with its `kept` flag) on disk.
    """
    stage: RestEMStage = ctx.stage
    correct = [v.correct for v in verdicts]
    kept = select_verified(roll.prompt_index, [tuple(c) for c in roll.completion_ids], correct, roll.finished,
                           stage.max_per_problem)
    write_samples(ctx.stage_dir / f"iter-{it + 1}" / "e_step_samples.jsonl", rows, roll, verdicts, set(kept))
    solved = {roll.prompt_index[i] for i, ok in enumerate(correct) if ok}
    K = stage.samples_per_problem
    row.update({"train_pass@1": float(np.mean(correct)), f"train_pass@{K}": len(solved) / len(prompts),
                "problems_sampled": len(prompts), "kept": len(kept),
                "problems_kept": len({roll.prompt_index[i] for i in kept})})
    verifier = ctx.recipe.data[stage.data].verifier
    if votes(verifier):
        voted = [[v.answer for v in verdicts[p * K : (p + 1) * K]] for p in range(len(prompts))]
        row[f"train_maj@{K}"] = maj_at_k(voted, list(rows["answer"]), K, answer_equal(verifier))
    if not kept:
        raise PosttrainError(f"stage {stage.name!r}: iteration {it + 1} kept no verified sample; the policy solves "
                             "none of the problems (train more SFT first, or raise samples_per_problem)")
    # Prompt tokens carry no loss: the M-step learns the solution given the problem.
    return [Example(prompts[roll.prompt_index[i]] + roll.completion_ids[i], len(prompts[roll.prompt_index[i]]))
            for i in kept]


def _problems_for(it: int, n: int, per_iteration: int | None, seed: int) -> list[int]:
    """The E-step's problems: all of the pool, or a fresh seeded subset each iteration."""
    if per_iteration is None or per_iteration >= n:
        return list(range(n))
    return sorted(np.random.default_rng([seed, it]).choice(n, per_iteration, replace=False).tolist())


def _log_row(ctx: StageContext, row: dict) -> None:
    numbers = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"}
    ctx.log(row["iteration"], numbers)
    log.info("%s iteration %d: %s", ctx.stage.name, row["iteration"], format_metrics(numbers))


def _load_table(ctx: StageContext) -> list[dict]:
    path = ctx.stage_dir / TABLE
    return json.loads(path.read_text()) if path.exists() else []


def _save_table(ctx: StageContext, table: list[dict]) -> None:
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.stage_dir / f".{TABLE}.tmp"
    tmp.write_text(json.dumps(table, indent=2))
    os.replace(tmp, ctx.stage_dir / TABLE)
