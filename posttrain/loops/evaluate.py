"""Eval: sample with the policy on held-out problems, verify, and report pass@1 / pass@k / maj@k."""

from __future__ import annotations

import json
import logging

import ray

from posttrain.cluster import Demand, gather, spawn
from posttrain.data.batching import encode_prompt
from posttrain.data.datasets import load_split
from posttrain.errors import PosttrainError
from posttrain.models.load import load_tokenizer
from posttrain.recipe.schema import EvalStage, SamplingConfig
from posttrain.scoring import maj_at_k, mean_pass_at_k
from posttrain.stage import StageContext, StageResult
from posttrain.tracking import format_metrics, progress
from posttrain.workers.sampler import SAMPLER_BACKENDS, Rollouts, greedy
from posttrain.workers.verifier import Verdict, VerifierWorker

log = logging.getLogger(__name__)


def run_eval(ctx: StageContext) -> StageResult:
    stage: EvalStage = ctx.stage
    cluster = ctx.recipe.cluster
    data_cfg = ctx.recipe.data[stage.data]
    rows = load_split(stage.data, data_cfg, stage.split)
    if stage.max_problems:
        rows = rows.select(range(min(stage.max_problems, len(rows))))
    if len(rows) == 0:
        raise PosttrainError(f"stage {stage.name!r}: data {stage.data}:{stage.split} is empty")
    if data_cfg.verifier is None:
        raise PosttrainError(f"stage {stage.name!r}: data.{stage.data} has no verifier; set data.{stage.data}.verifier")
    if any(a is None for a in rows["answer"]):
        raise PosttrainError(f"stage {stage.name!r}: data {stage.data}:{stage.split} has rows without an `answer`")
    tok = load_tokenizer(ctx.model_path)
    prompts = [encode_prompt(tok, row) for row in rows]
    answers = list(rows["answer"])

    scfg, vcfg = cluster.sampler, cluster.verifier
    samplers = spawn(SAMPLER_BACKENDS[scfg.backend], Demand("sampler", scfg.actors, scfg.cpus, scfg.gpus),
                     [(ctx.model_path, ctx.recipe.model.dtype, max(1, int(scfg.cpus)))] * scfg.actors)
    verifiers = spawn(VerifierWorker, Demand("verifier", vcfg.actors, vcfg.cpus, 0.0),
                      [(data_cfg.verifier,)] * vcfg.actors)
    metrics: dict[str, float] = {"problems": float(len(prompts))}
    with samplers as s_actors, verifiers as v_actors:
        if stage.greedy:
            roll = _sample(s_actors, prompts, 1, greedy(stage.max_new_tokens), scfg.batch_size, f"{stage.name} greedy",
                           ctx.recipe.seed)
            verdicts = _verify(v_actors, roll, answers)
            metrics["pass@1"] = sum(v.correct for v in verdicts) / len(verdicts)
            metrics["mean_completion_tokens"] = sum(map(len, roll.completion_ids)) / len(roll.completion_ids)
            metrics["truncated_frac"] = 1.0 - sum(roll.finished) / len(roll.finished)
            _write_samples(ctx, "greedy", rows, roll, verdicts)
        if stage.samples:
            n = stage.samples
            roll = _sample(s_actors, prompts, n, stage.sampling, scfg.batch_size, f"{stage.name} sample x{n}",
                           ctx.recipe.seed)
            verdicts = _verify(v_actors, roll, answers)
            correct = [[v.correct for v in verdicts[i * n : (i + 1) * n]] for i in range(len(prompts))]
            voted = [[v.answer for v in verdicts[i * n : (i + 1) * n]] for i in range(len(prompts))]
            equal = _equal_fn(data_cfg.verifier)
            for k in stage.pass_k:
                key = "pass@1_sampled" if (k == 1 and stage.greedy) else f"pass@{k}"
                metrics[key] = mean_pass_at_k(correct, k)
                metrics[f"maj@{k}"] = maj_at_k(voted, answers, k, equal=equal)
            _write_samples(ctx, f"sampled{n}", rows, roll, verdicts)
    ctx.log(0, metrics)
    log.info("%s: %s", stage.name, format_metrics(metrics))
    return StageResult(metrics, None)


def _sample(samplers: list, prompts: list[list[int]], n: int, params: SamplingConfig, batch_size: int, desc: str,
            seed: int) -> Rollouts:
    """Fan batches of prompts out to the samplers round-robin and stitch the rollouts back in order.

    Chunk j is sampled with seed (seed, j): the same recipe gives the same samples for any actor count.
    """
    per_call = max(1, batch_size // n)  # prompts per generate call, so each call holds ~batch_size sequences
    chunks = [list(range(i, min(i + per_call, len(prompts)))) for i in range(0, len(prompts), per_call)]
    pending = {samplers[j % len(samplers)].generate.remote([prompts[i] for i in c], n, params, batch_size,
                                                           seed * 1_000_003 + j): j
               for j, c in enumerate(chunks)}
    results: dict[int, Rollouts] = {}
    bar = progress(total=len(prompts) * n, desc=desc, unit="seq")
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        j = pending.pop(ready[0])
        results[j] = ray.get(ready[0])
        bar.update(len(chunks[j]) * n)
    bar.close()
    out = Rollouts([], [], [], [], [], results[0].version, n)
    for j, c in enumerate(chunks):
        r = results[j]
        out.prompt_index += [c[i] for i in r.prompt_index]
        out.completion_ids += r.completion_ids
        out.logprobs += r.logprobs
        out.text += r.text
        out.finished += r.finished
    return out


def _verify(verifiers: list, roll: Rollouts, answers: list[str]) -> list[Verdict]:
    refs = [answers[i] for i in roll.prompt_index]
    size = -(-len(refs) // len(verifiers))
    calls = [v.score.remote(roll.text[i : i + size], refs[i : i + size]) for v, i in zip(verifiers, range(0, len(refs), size))]
    verdicts = [v for part in gather(calls) for v in part]
    for i, v in enumerate(verdicts):
        if v.error:
            log.warning("verifier error on problem %d: %s", roll.prompt_index[i], v.error)
    return verdicts


def _equal_fn(verifier: str):
    from posttrain.verifiers import get_verifier

    return get_verifier(verifier).equal


def _write_samples(ctx: StageContext, tag: str, rows, roll: Rollouts, verdicts: list[Verdict]) -> None:
    """Every completion with its verdict, for reading what the model actually wrote."""
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    with open(ctx.stage_dir / f"samples_{tag}.jsonl", "w") as fh:
        for i, text, v, done in zip(roll.prompt_index, roll.text, verdicts, roll.finished):
            row = rows[i]
            fh.write(json.dumps({"id": row["id"], "prompt": row["prompt"], "completion": text, "answer": v.answer,
                                 "reference": row["answer"], "correct": v.correct, "finished": done,
                                 "error": v.error}) + "\n")
