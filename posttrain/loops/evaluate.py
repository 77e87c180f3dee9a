"""Eval: sample with the policy on held-out problems, verify, and report pass@1 / pass@k / maj@k."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

from posttrain.cluster import Demand, gather, spawn
from posttrain.data.batching import encode_prompt
from posttrain.data.datasets import load_split
from posttrain.errors import PosttrainError
from posttrain.models.load import load_tokenizer
from posttrain.models.weights import WeightSyncError
from posttrain.recipe.schema import EvalStage, Recipe, SamplingConfig
from posttrain.scoring import maj_at_k, mean_pass_at_k, rerank_at_k
from posttrain.stage import StageContext, StageResult
from posttrain.verifiers import answer_equal, votes
from posttrain.tracking import format_metrics, progress
from posttrain.workers.sampler import SAMPLER_BACKENDS, Rollouts, greedy
from posttrain.workers.verifier import Verdict, VerifierWorker

log = logging.getLogger(__name__)


def run_eval(ctx: StageContext) -> StageResult:
    stage: EvalStage = ctx.stage
    data_cfg = ctx.recipe.data[stage.data]
    rows = load_split(stage.data, data_cfg, stage.split)
    if stage.max_problems:
        rows = rows.select(range(min(stage.max_problems, len(rows))))
    if len(rows) == 0:
        raise PosttrainError(f"stage {stage.name!r}: data {stage.data}:{stage.split} is empty")
    if any(a is None for a in rows["answer"]):
        raise PosttrainError(f"stage {stage.name!r}: data {stage.data}:{stage.split} has rows without an `answer`")
    tok = load_tokenizer(ctx.model_path)
    prompts = [encode_prompt(tok, row) for row in rows]
    with policy_actors(ctx.recipe, ctx.model_path, data_cfg.verifier) as (samplers, verifiers):
        metrics = evaluate_policy(
            samplers, verifiers, rows, prompts, verifier_name=data_cfg.verifier,
            greedy_tokens=stage.max_new_tokens if stage.greedy else None, samples=stage.samples,
            pass_k=stage.pass_k, sampling=stage.sampling, batch_size=ctx.recipe.cluster.sampler.batch_size,
            seed=ctx.recipe.seed, desc=stage.name, samples_dir=ctx.stage_dir, rerank_top=stage.rerank_top)
    ctx.log(0, metrics)
    log.info("%s: %s", stage.name, format_metrics(metrics))
    return StageResult(metrics, None)


def sampler_actors(recipe: Recipe, model_path: str, demand: Demand | None = None, version: int = 0,
                   sleep_mode: bool = False):
    """Sampler actors serving `model_path` as weights `version` (a context manager that removes them on exit);
    `demand`: what each reserves (default: cluster.sampler's own share); sleep_mode: vLLM engines that can free
    their GPU memory while colocated learners train."""
    scfg = recipe.cluster.sampler
    extra = (scfg.gpu_memory_utilization, "merged", sleep_mode) if scfg.backend == "vllm" else (scfg.decode,)
    return spawn(SAMPLER_BACKENDS[scfg.backend], demand or Demand("sampler", scfg.actors, scfg.cpus, scfg.gpus),
                 [(model_path, recipe.model.dtype, max(1, int(scfg.cpus)), version) + extra] * scfg.actors)


def verifier_actors(recipe: Recipe, verifier: str):
    """Verifier actors for `verifier` (a context manager that removes them on exit)."""
    vcfg = recipe.cluster.verifier
    workers = vcfg.workers or max(1, round(vcfg.cpus))  # concurrent checks per verifier actor
    return spawn(VerifierWorker, Demand("verifier", vcfg.actors, vcfg.cpus, 0.0), [(verifier, workers)] * vcfg.actors)


@contextmanager
def policy_actors(recipe: Recipe, model_path: str, verifier: str) -> Iterator[tuple[list, list]]:
    """Sampler actors serving `model_path` and verifier actors, removed on exit."""
    with sampler_actors(recipe, model_path) as s_actors, verifier_actors(recipe, verifier) as v_actors:
        yield s_actors, v_actors


def evaluate_policy(samplers: list, verifiers: list, rows, prompts: list[list[int]], *, verifier_name: str,
                    greedy_tokens: int | None, samples: int, pass_k: list[int], sampling: SamplingConfig,
                    batch_size: int, seed: int, desc: str, samples_dir: Path | None = None,
                    rerank_top: int = 0) -> dict[str, float]:
    """Greedy pass@1 (when greedy_tokens is set), and with `samples` > 0 the unbiased pass@k and maj@k,
    plus solution-cluster re-ranking accuracy when rerank_top > 0."""
    answers = list(rows["answer"])
    metrics: dict[str, float] = {"problems": float(len(prompts))}
    if greedy_tokens:
        roll = sample(samplers, prompts, 1, greedy(greedy_tokens), batch_size, f"{desc} greedy", seed)
        verdicts = verify(verifiers, roll, answers, list(rows["id"]))
        metrics["pass@1"] = sum(v.correct for v in verdicts) / len(verdicts)
        metrics["mean_completion_tokens"] = sum(map(len, roll.completion_ids)) / len(roll.completion_ids)
        metrics["truncated_frac"] = 1.0 - sum(roll.finished) / len(roll.finished)
        if samples_dir is not None:
            write_samples(samples_dir / "samples_greedy.jsonl", rows, roll, verdicts)
    if samples:
        n = samples
        roll = sample(samplers, prompts, n, sampling, batch_size, f"{desc} sample x{n}", seed)
        verdicts = verify(verifiers, roll, answers, list(rows["id"]))
        correct = [[v.correct for v in verdicts[i * n : (i + 1) * n]] for i in range(len(prompts))]
        voted = [[v.answer for v in verdicts[i * n : (i + 1) * n]] for i in range(len(prompts))]
        voting = votes(verifier_name)
        equal = answer_equal(verifier_name)
        for k in pass_k:
            key = "pass@1_sampled" if (k == 1 and greedy_tokens) else f"pass@{k}"
            metrics[key] = mean_pass_at_k(correct, k)
            if voting:
                metrics[f"maj@{k}"] = maj_at_k(voted, answers, k, equal=equal)
        if rerank_top and voting:
            # Scorer: the policy's own likelihood, length-normalised so short and long solutions compare.
            scores = [sum(lp) / max(1, len(lp)) for lp in roll.logprobs]
            per_problem = [scores[i * n : (i + 1) * n] for i in range(len(prompts))]
            metrics[f"rerank@{n}"] = rerank_at_k(voted, per_problem, answers, rerank_top, equal)
        if samples_dir is not None:
            write_samples(samples_dir / f"samples_sampled{n}.jsonl", rows, roll, verdicts)
    return metrics


def sample(samplers: list, prompts: list[list[int]], n: int, params: SamplingConfig, batch_size: int, desc: str,
            seed: int) -> Rollouts:
    """Fan batches of prompts out to the samplers round-robin and stitch the rollouts back in order.

    Chunk j is sampled with seed (seed, j): the same recipe and sampler count give the same samples.
    """
    per_call = max(1, batch_size // n)  # prompts per generate call, so each call holds ~batch_size sequences
    per_call = min(per_call, -(-len(prompts) // len(samplers)))  # a small request still keeps every sampler busy
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
    versions = sorted({r.version for r in results.values()})
    if len(versions) > 1:
        raise WeightSyncError(f"the samplers served different weights versions {versions} in one batch of rollouts: "
                              "a sampler missed a weight update")
    out = Rollouts([], [], [], [], [], versions[0], n)
    for j, c in enumerate(chunks):
        r = results[j]
        out.prompt_index += [c[i] for i in r.prompt_index]
        out.completion_ids += r.completion_ids
        out.logprobs += r.logprobs
        out.text += r.text
        out.finished += r.finished
    return out


def verify(verifiers: list, roll: Rollouts, answers: list[str], ids: list[str] | None = None) -> list[Verdict]:
    """Verdicts in rollout order; verifier errors and timeouts count as incorrect and are logged by sample id."""
    refs = [answers[i] for i in roll.prompt_index]
    size = -(-len(refs) // len(verifiers))
    calls = [v.score.remote(roll.text[i : i + size], refs[i : i + size]) for v, i in zip(verifiers, range(0, len(refs), size))]
    verdicts = [v for part in gather(calls) for v in part]
    for i, v in enumerate(verdicts):
        if v.error:
            p = roll.prompt_index[i]
            log.warning("verifier error on %s (sample %d): %s", ids[p] if ids else f"problem {p}", i % roll.n, v.error)
    return verdicts


def write_samples(path: Path, rows, roll: Rollouts, verdicts: list[Verdict], kept: set[int] | None = None) -> None:
    """Every completion with its verdict (and, for an E-step, whether it was kept), for reading what the model wrote."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids, prompts, refs = rows["id"], rows["prompt"], rows["answer"]  # columns once, not a Dataset lookup per sample
    with open(path, "w") as fh:
        for j, (i, text, v, done) in enumerate(zip(roll.prompt_index, roll.text, verdicts, roll.finished)):
            record = {"id": ids[i], "prompt": prompts[i], "completion": text, "answer": v.answer,
                      "reference": refs[i], "correct": v.correct, "finished": done, "error": v.error}
            if kept is not None:
                record["kept"] = j in kept
            fh.write(json.dumps(record) + "\n")
