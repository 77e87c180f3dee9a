"""Online RL: PPO, GRPO and RLOO in one loop.

Each step: prompts -> samplers (weights version v) -> verifier or reward model -> rewards -> the learners' log-probs
of the samples (old policy, reference) [-> the critic's values] -> advantages -> minibatch updates on the DeepSpeed
learners [and the critic] -> push weights v+1 to the samplers -> parity probe -> monitors, eval, atomic checkpoint.

Weight sync is verified, never assumed: rollouts carry the version they were sampled with and the loop refuses any
other; after every push the samplers and the learner score one fixed sequence and must agree within a tolerance.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import torch

from posttrain.algorithms.grpo import group_advantages, no_eos_reward, rloo_advantages
from posttrain.algorithms.ppo import gae, token_rewards, whiten
from posttrain.algorithms.rl_objective import RLObjective
from posttrain.algorithms.running_stats import RunningMoments
from posttrain.cluster import Demand, gather, round_robin, spawn, stage_phases
from posttrain.data.batching import (Example, Packing, RLSample, collate, deal_even, encode_prompt, pad_rows,
                                     step_indices)
from posttrain.data.datasets import load_split
from posttrain.errors import PosttrainError
from posttrain.loops.evaluate import evaluate_policy, sample, sampler_actors, verifier_actors, verify
from posttrain.loops.supervised import encode_sft_split, learner_group, save_step
from posttrain.models.load import load_tokenizer
from posttrain.models.weights import WeightSyncError, parity_report, require_parity, require_version
from posttrain.recipe.schema import PAIR_FORMATS, CriticConfig, MonitorConfig, OnlineRLStage
from posttrain.stage import StageContext, StageResult
from posttrain.tracking import format_metrics, progress
from posttrain.workers.reward_model import RewardModelWorker
from posttrain.workers.sampler import greedy

log = logging.getLogger(__name__)

STATE_FILE = "rl_state.json"  # beside the learners' files in each checkpoint: what the loop itself must resume
CRITIC_DIR = "critic"


@dataclass
class Problems:
    """The prompts the stage samples from (tokenised) and what scores them."""

    rows: object  # datasets.Dataset with prompt (+ answer, id, messages)
    prompts: list[list[int]]
    keep: list[int]  # row numbers of `rows` whose prompt fits max_prompt_length


@dataclass
class LoopState:
    """Everything besides the actors' weights that a resumed run needs to continue exactly."""

    reward_stats: RunningMoments = field(default_factory=RunningMoments)  # PPO-max's running reward statistics
    first_length: float | None = None  # mean response length of the first step (length drift)
    bad_in_a_row: int = 0
    probe: tuple[list[int], list[int]] | None = None  # the parity probe's (prompt, completion), fixed for the run
    pushed: Push | None = None  # the last weight push, until its checks come back (not saved: a resume loads anew)

    def to_json(self) -> str:
        return json.dumps({"reward_stats": self.reward_stats.state_dict(), "first_length": self.first_length,
                           "bad_in_a_row": self.bad_in_a_row, "probe": self.probe})

    @classmethod
    def load(cls, ckpt: Path | None) -> LoopState:
        if ckpt is None or not (ckpt / STATE_FILE).exists():
            return cls()
        d = json.loads((ckpt / STATE_FILE).read_text())
        state = cls(first_length=d["first_length"], bad_in_a_row=d["bad_in_a_row"],
                    probe=tuple(d["probe"]) if d.get("probe") else None)
        state.reward_stats.load_state_dict(d["reward_stats"])
        return state


@dataclass
class Actors:
    learners: list
    critics: list  # PPO's value model (a second learner group); empty otherwise
    samplers: list
    verifiers: list  # when the reward or the held-out eval needs answers checked
    scorers: list  # reward-model actors when the reward comes from one
    sleep: bool = False  # colocated vLLM samplers free their GPU memory while the learners train
    lockstep: bool = False  # ZeRO-3: every learner rank takes part in each forward (parameter gathers)


def run_online_rl(ctx: StageContext) -> StageResult:
    stage: OnlineRLStage = ctx.stage
    tok = load_tokenizer(ctx.model_path)
    train = load_problems(ctx, tok, stage.train_split, limit=None)
    held_out = load_problems(ctx, tok, stage.eval_split, limit=stage.eval_problems) if stage.eval_split else None
    ptx = None
    if stage.ptx is not None:  # PPO-ptx: the supervised data whose language-model loss joins every policy update
        p = stage.ptx
        ptx = encode_sft_split(stage.name, p.data, ctx.recipe.data[p.data], p.split, tok, p.max_length)
    cfg = stage.objective_config()
    objective = RLObjective(stage.kind, **({"ppo": cfg} if stage.kind == "ppo" else {"grpo": cfg}),
                            tis_cap=stage.truncated_is, z_loss_coef=stage.z_loss)
    ckpt_root = ctx.stage_dir / "checkpoints"
    packing = Packing(tok.pad_token_id, shared_prefix_supported(ctx.model_path, *(
        [ctx.resolve(_critic_source(ctx))] if stage.kind == "ppo" else [])))
    with ExitStack() as stack:
        actors, counts, start, resumed = _start_actors(ctx, stack, len(train.keep), held_out is not None)
        state = LoopState.load(resumed)
        if state.probe is not None:  # resumed: the samplers loaded the checkpoint; probed before they sample
            state.pushed = Push(start, [], [], *_probes(actors, state.probe))
        tolerance = _tolerance(stage, ctx.recipe.model.dtype)
        metrics: dict[str, float] = {}
        if held_out and start == 0:
            metrics.update(_evaluate(ctx, actors, held_out, 0))
        last_ckpt = str(resumed) if resumed else None
        active: set[str] = set()  # monitors over their threshold: warned once per crossing
        bar = progress(total=stage.steps, initial=start, desc=f"{stage.name} {stage.kind}", unit="step")
        for step in range(start, stage.steps):
            row = _rl_step(ctx, actors, objective, train, step, state, packing, ptx)
            done = step + 1
            active = _report_monitors(stage, row, active, done)
            if done % stage.log_every == 0 or done == stage.steps:
                ctx.log(done, row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row.get('kl', 0.0):.4f}")
            metrics.update({k: row[k] for k in ("reward_mean", "kl", "entropy") if k in row})
            if state.bad_in_a_row >= stage.max_bad_steps:
                raise PosttrainError(
                    f"stage {stage.name!r}: {state.bad_in_a_row} updates in a row had a non-finite loss or gradient "
                    f"and were skipped (last: step {done}); stopping. The last checkpoint ({last_ckpt or 'none yet'}) "
                    "is intact: lower optim.lr, check rewards for extreme values, or set z_loss, then --resume.")
            if held_out and (done % stage.eval_every == 0 or done == stage.steps):
                _log(ctx, done, _settle(state, tolerance))  # eval only checked weights
                metrics.update(_evaluate(ctx, actors, held_out, done))
            if done % stage.save_every == 0 or done == stage.steps:
                last_ckpt = str(_save(ctx, actors, ckpt_root, done, metrics, state))
        _log(ctx, stage.steps, _settle(state, tolerance))  # the last push is checked too
        bar.close()
    return StageResult(metrics, last_ckpt, {"start_digest": counts["start_digest"]})


def _log(ctx: StageContext, step: int, metrics: dict[str, float]) -> None:
    if metrics:
        ctx.log(step, metrics)


def _rl_step(ctx: StageContext, actors: Actors, objective: RLObjective, train: Problems, step: int,
             state: LoopState, packing: Packing, ptx: list[Example] | None = None) -> dict[str, float]:
    """One RL step, from sampling with weights version `step` to pushing version `step + 1`; returns its metrics.

    The push is checked in the next step, once its samples are back (or before an eval): each sampler loads the
    weights before it runs anything asked of it later, so the checks need no round trip of their own."""
    stage: OnlineRLStage = ctx.stage
    recipe = ctx.recipe
    t0 = time.perf_counter()
    idx = [train.keep[i] for i in step_indices(len(train.keep), stage.prompts_per_step, step, recipe.seed)]
    tolerance = _tolerance(stage, recipe.model.dtype)
    try:
        roll = sample(actors.samplers, [train.prompts[i] for i in idx], stage.samples_per_prompt, stage.sampling,
                      recipe.cluster.sampler.batch_size, f"{stage.name} step {step + 1} sample",
                      seed=recipe.seed * 1_000_003 + 7919 * (step + 1))
    except WeightSyncError:  # samplers on different versions: a failed load says why, when there was one
        _settle(state, tolerance)
        raise
    if roll.version != step:  # stale samples: a failed load's own error says why, when there was one
        _settle(state, tolerance)
    require_version(roll.version, step)  # the weights pushed after the previous update, nothing older
    if state.pushed is not None:
        state.pushed.ask_probes()  # the weights these samples came from, checked below before any training
    t_sample = time.perf_counter()
    rewards, valid, scores = score_rollouts(ctx, roll, train.rows, idx, actors.verifiers, actors.scorers)
    row = _settle(state, tolerance)
    row.update(scores)
    samples, kept = _training_samples(train, idx, roll, valid)
    if state.probe is None and samples:  # fixed for the rest of the run; checked before any update too
        state.probe = (samples[0].prompt, samples[0].completion)
        row.update(_check_push(Push(step, [], [], *_probes(actors, state.probe)), tolerance))
    t_score = time.perf_counter()
    if actors.sleep:
        gather([s.sleep.remote() for s in actors.samplers])
    row.update(_advantages(stage, actors, samples, rewards[kept], roll, kept, state, packing))
    t_adv = time.perf_counter()
    probe = state.probe is not None and (step + 1) % stage.sync.probe_every == 0
    pushed: list[Push] = []

    def push() -> None:  # dispatched behind the last update: each rank hands over its weights as soon as it is done
        pushed.append(_push_weights(actors, step + 1, state.probe if probe else None))

    # colocated vLLM samplers wake up (below) before they can load weights
    row.update(_update(stage, objective, actors, samples, packing, step, ptx, recipe.seed,
                       then=None if actors.sleep else push))
    state.bad_in_a_row = state.bad_in_a_row + 1 if row["skipped_updates"] else 0
    t_learn = time.perf_counter()
    if actors.sleep:
        gather([s.wake_up.remote() for s in actors.samplers])
    if not pushed:  # no update this step (too few usable samples), or the samplers were asleep
        push()
    state.pushed = pushed[0]
    t_end = time.perf_counter()
    mean_len = float(np.mean([len(c) for c in roll.completion_ids]))
    state.first_length = state.first_length or mean_len
    row.update({"response_length": mean_len, "length_drift": mean_len / state.first_length - 1.0,
                "truncated_frac": 1.0 - float(np.mean(roll.finished)), "step_s": t_end - t0,
                "sample_s": t_sample - t0, "score_s": t_score - t_sample, "prepare_s": t_adv - t_score,
                "learn_s": t_learn - t_adv, "sync_s": t_end - t_learn,
                "completions_per_s": len(roll.text) / (t_end - t0), "weights_version": float(step + 1)})
    return row


def _start_actors(ctx: StageContext, stack: ExitStack, n_prompts: int, evaluates: bool):
    """Learners (restored when resuming), the critic (PPO), samplers serving the learners' weights, and the scorers.
    Returns (actors, parameter counts, first step, checkpoint resumed from or None)."""
    stage: OnlineRLStage = ctx.stage
    recipe = ctx.recipe
    cfg = stage.objective_config()
    kl_weight = cfg.kl_coef if stage.kind == "ppo" else cfg.beta
    demands = {d.role: d for d in stage_phases(recipe.cluster, stage)[0]}
    updates = stage.steps * stage.epochs * stage.mini_batches  # optimizer steps: the LR schedule's length
    learners, counts, start, resume_from = stack.enter_context(learner_group(
        ctx, ctx.model_path, stage, ctx.stage_dir / "checkpoints", ctx.resume, f"{n_prompts} prompts, {stage.kind}",
        demand=demands["learner"], live_reference=kl_weight > 0, total_steps=updates))
    resumed = Path(resume_from[0]) if resume_from else None
    critics = []
    if stage.kind == "ppo":
        critics = stack.enter_context(_critic_group(ctx, demands["critic"], updates))[0]
        if resumed is not None:
            gather([c.load.remote(str(resumed / CRITIC_DIR)) for c in critics])
    sleep = stage.colocate and recipe.cluster.sampler.backend == "vllm"
    samplers = stack.enter_context(sampler_actors(recipe, str(resumed or ctx.model_path), demands["sampler"],
                                                  version=start, sleep_mode=sleep))
    verifiers = (stack.enter_context(verifier_actors(recipe, recipe.data[stage.data].verifier))
                 if stage.reward.source == "verifier" or evaluates else [])
    scorers = stack.enter_context(_reward_models(ctx, demands["reward_model"])) if "reward_model" in demands else []
    lcfg = recipe.cluster.learner
    lockstep = lcfg.backend == "deepspeed" and lcfg.zero_stage == 3
    return Actors(learners, critics, samplers, verifiers, scorers, sleep, lockstep), counts, start, resumed


# ------------------------------------------------------------------------------------------ data


def load_problems(ctx: StageContext, tok, split: str, limit: int | None) -> Problems:
    """The split's prompts, tokenised; prompts longer than max_prompt_length are left out and reported by row."""
    stage: OnlineRLStage = ctx.stage
    cfg = ctx.recipe.data[stage.data]
    if cfg.format in PAIR_FORMATS:  # a pair dataset's prompts (its responses are not used): reward-model rewards
        from datasets import Dataset

        from posttrain.data.pairs import load_pairs

        pairs, _ = load_pairs(stage.data, cfg.path, PAIR_FORMATS[cfg.format], split, max_rows=cfg.max_rows,
                              skip_bad_rows=True)
        rows = Dataset.from_list([{"id": f"{stage.data}:{split}:{p['row']}", "prompt": p["prompt"],
                                   "messages": p["messages"]} for p in pairs])
    else:
        rows = load_split(stage.data, cfg, split)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    if len(rows) == 0:
        raise PosttrainError(f"stage {stage.name!r}: data {stage.data}:{split} is empty")
    prompts = [encode_prompt(tok, r) for r in rows]
    keep = [i for i, p in enumerate(prompts) if len(p) <= stage.max_prompt_length]
    if len(keep) < len(prompts):
        long = [i for i, p in enumerate(prompts) if len(p) > stage.max_prompt_length]
        at = ", ".join(map(str, long[:5])) + (" ..." if len(long) > 5 else "")
        log.warning("%s: %d of %d prompts of %s:%s are longer than max_prompt_length=%d tokens and are left out "
                    "(rows %s)", stage.name, len(long), len(prompts), stage.data, split, stage.max_prompt_length, at)
    if not keep:
        raise PosttrainError(f"stage {stage.name!r}: no prompt of {stage.data}:{split} fits max_prompt_length="
                             f"{stage.max_prompt_length}")
    return Problems(rows, prompts, keep)


def score_rollouts(ctx: StageContext, roll, rows, idx: list[int], verifiers: list,
                   scorers: list) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Shaped rewards (N,) in rollout order, which of them are usable (N,) bool, and the step's reward metrics.

    A sample whose reward could not be computed (the verifier failed on it, the reward model raised or returned a
    non-finite score) is marked unusable and logged; it is left out of the group statistics and of training.
    """
    stage: OnlineRLStage = ctx.stage
    r = stage.reward
    sub = rows.select(idx)
    ids = list(sub["id"]) if "id" in sub.column_names else [str(i) for i in idx]
    metrics: dict[str, float] = {}
    if r.source == "verifier":
        verdicts = verify(verifiers, roll, list(sub["answer"]), ids)
        raw = torch.tensor([r.correct * float(v.correct) for v in verdicts])
        valid = torch.tensor([v.error is None for v in verdicts])
        metrics["pass_rate"] = float(np.mean([v.correct for v in verdicts]))
    else:
        raw, valid = _reward_model_scores(scorers, sub, roll, ids, stage.name)
    rewards = no_eos_reward(raw, torch.tensor(roll.finished), r.no_eos_penalty)
    empty = [i for i, t in enumerate(roll.text) if not t.strip()]
    if empty:
        log.info("%s: %d of %d completions are empty (scored as written)", stage.name, len(empty), len(roll.text))
    good = rewards[valid]
    metrics.update({"reward_mean": good.mean().item() if good.numel() else math.nan,
                    "reward_std": good.std().item() if good.numel() > 1 else 0.0,
                    "invalid_rewards": float((~valid).sum()), "empty_completions": float(len(empty))})
    return rewards, valid, metrics


def _reward_model_scores(scorers: list, sub, roll, ids: list[str], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    texts = list(sub["prompt"])
    messages = list(sub["messages"]) if "messages" in sub.column_names else [None] * len(sub)
    rows = [{"prompt": texts[p], "messages": messages[p]} for p in roll.prompt_index]
    chunks = [list(range(j, len(rows), len(scorers))) for j in range(len(scorers))]
    refs = [s.score.remote([rows[i] for i in c], [roll.text[i] for i in c]) for s, c in zip(scorers, chunks)]
    scores = torch.full((len(rows),), math.nan)
    for c, ref in zip(chunks, refs):
        try:
            scores[c] = torch.tensor(ray.get(ref), dtype=torch.float32)
        except ray.exceptions.RayTaskError as exc:  # a failing chunk is marked, the step goes on without it
            log.warning("%s: the reward model failed on %d samples (%s); they are left out", name, len(c),
                        str(exc).strip().splitlines()[-1])
    valid = torch.isfinite(scores)
    for i in (~valid).nonzero().flatten().tolist()[:5]:
        log.warning("%s: no usable reward for %s (sample %d): %s", name, ids[roll.prompt_index[i]], i % roll.n,
                    scores[i].item())
    return scores, valid


def _training_samples(train: Problems, idx, roll, valid: torch.Tensor) -> tuple[list[RLSample], torch.Tensor]:
    """The samples that can be trained on (usable reward, at least one completion token), and their positions."""
    kept = [i for i in range(len(roll.text)) if valid[i] and roll.completion_ids[i]]
    samples = [RLSample(train.prompts[idx[roll.prompt_index[i]]], roll.completion_ids[i], roll.logprobs[i]) for i in kept]
    return samples, torch.tensor(kept, dtype=torch.long)


# ------------------------------------------------------------------------------------------ advantages


def _advantages(stage: OnlineRLStage, actors: Actors, samples: list[RLSample], rewards: torch.Tensor, roll,
                kept: torch.Tensor, state: LoopState, packing: Packing) -> dict[str, float]:
    """Fill each sample's old/ref log-probs (and values, returns) from the actors, then its advantages.

    GRPO/RLOO with one update per rollout skip that pass: the update's own forward is the old policy, and the
    reference scores each micro-batch inside the update (one forward fewer, no extra round trip)."""
    if not samples:  # every reward unusable or every completion empty: nothing to learn from this step
        return {}
    if stage.kind == "ppo" or stage.epochs * stage.mini_batches > 1:
        _fill(actors.learners, samples, stage.micro_batch_size, packing)
    if stage.kind != "ppo":
        n = len(roll.text)
        full = torch.full((n,), math.nan)
        full[kept] = rewards
        ok = torch.zeros(n, dtype=torch.bool)
        ok[kept] = True
        cfg = stage.objective_config()
        adv = (rloo_advantages(full, roll.n, ok) if stage.kind == "rloo"
               else group_advantages(full, roll.n, cfg.scale_by_std, cfg.eps, ok))[kept]
        for s, a in zip(samples, adv.tolist()):
            s.advantages = [a] * len(s.completion)
        return {"advantage_abs_mean": adv.abs().mean().item() if adv.numel() else 0.0,
                "zero_advantage_frac": (adv == 0).float().mean().item() if adv.numel() else 1.0}
    return _ppo_advantages(stage, actors.critics, samples, rewards, state, packing)


def _ppo_advantages(stage, critics, samples, scores, state: LoopState, packing: Packing) -> dict[str, float]:
    cfg = stage.objective_config()
    _fill(critics, samples, stage.micro_batch_size, packing)
    logp, mask = pad_rows([s.old_logps for s in samples])
    ref = pad_rows([s.ref_logps for s in samples])[0] if cfg.kl_coef else logp
    values = pad_rows([s.old_values for s in samples])[0]
    if cfg.reward_norm:  # against the running statistics of every score so far, this batch included
        state.reward_stats.update(scores)
        scores = state.reward_stats.normalize(scores, cfg.reward_clip)
    elif cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    rewards = token_rewards(scores, logp, ref, mask, cfg.kl_coef, cfg.kl_estimator)
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = whiten(adv, mask)
    for i, s in enumerate(samples):
        n = len(s.completion)
        s.advantages, s.returns = adv[i, :n].tolist(), returns[i, :n].tolist()
    m = mask.bool()
    return {"score_normalised_mean": scores.mean().item(), "value_mean": values[m].mean().item(),
            "return_mean": returns[m].mean().item(), "advantage_abs_mean": adv[m].abs().mean().item()}


def shared_prefix_supported(*model_paths: str) -> bool:
    """Whether every model (a directory with config.json, or a LoRA adapter over one) runs the shared-prefix
    attention exactly: the architectures the lean decoder runs."""
    from transformers import AutoConfig

    from posttrain.models.decode import unsupported_reason
    from posttrain.models.load import adapter_base, is_adapter_dir

    return all(unsupported_reason(AutoConfig.from_pretrained(adapter_base(p) if is_adapter_dir(p) else p)) is None
               for p in model_paths)


def _fill(actors, samples: list[RLSample], mbs: int, packing: Packing) -> None:
    """The actors' per-token scores of every sample before any update (rollout_logps), written onto the samples."""
    order = packing.order(samples)
    micro = [order[i : i + mbs] for i in range(0, len(order), mbs)]
    outs = round_robin(actors, "rollout_logps", [packing.batch([samples[i] for i in mb]) for mb in micro],
                       lockstep=True)
    for mb, out in zip(micro, outs):
        for name, per_seq in out.items():
            for i, values in zip(mb, per_seq):
                setattr(samples[i], name, values)


# ------------------------------------------------------------------------------------------ updates


def _update(stage: OnlineRLStage, objective: RLObjective, actors: Actors, samples: list[RLSample], packing: Packing,
            step: int, ptx: list[Example] | None = None, seed: int = 0,
            then: Callable[[], None] | None = None) -> dict[str, float]:
    """`epochs` passes of `mini_batches` optimizer steps over the rollout; the critic takes the same minibatches.
    With PPO-ptx each optimizer step also takes the next ptx.batch_size supervised sequences (a pure function of
    the optimizer step, so a resumed run sees the same ones). `then()` is called once the last update is
    dispatched, before its results are awaited."""
    learners, critics = actors.learners, actors.critics
    world = len(learners)
    gas = stage.batch_size // (world * stage.micro_batch_size)
    if len(samples) < world * gas * stage.mini_batches:
        log.warning("%s: only %d usable samples, too few for %d minibatch(es) of %d micro-batches: no update this "
                    "step", stage.name, len(samples), stage.mini_batches, world * gas)
        return {"skipped_updates": 0.0, "updates": 0.0}
    policy_sums: dict[str, float] = {}
    value_sums: dict[str, float] = {}
    skipped, n_updates, last = 0, 0, {}
    rng = np.random.default_rng([stage.mini_batches, step])
    for _ in range(stage.epochs):
        order = rng.permutation(len(samples)) if stage.mini_batches > 1 else np.arange(len(samples))
        for part in np.array_split(order, stage.mini_batches):
            mb_samples = [samples[i] for i in part]
            batches = packing.deal(mb_samples, world, gas)  # [rank][micro-batch] samples, collated by the ranks
            totals = {"seqs": float(len(mb_samples)), "tokens": float(sum(len(s.completion) for s in mb_samples))}
            lm = [None] * world
            if ptx:
                update = step * stage.epochs * stage.mini_batches + n_updates  # the optimizer step, over the run
                rows = [ptx[i] for i in step_indices(len(ptx), stage.ptx.batch_size, update, seed)]
                lm = [[collate(m, packing.pad_id) for m in rank]
                      for rank in deal_even(rows, world, gas, _example_length)]
                totals["ptx_tokens"] = float(sum(b.n_target_tokens for rank in lm for b in rank))
            seed_u = step * 1000 + n_updates
            refs = [lr.rl_step.remote(seed_u, batches[r], totals, objective, lm[r], packing)
                    for r, lr in enumerate(learners)]
            refs += [c.value_step.remote(seed_u, batches[r], totals, objective.ppo, packing)
                     for r, c in enumerate(critics)]
            if then is not None and n_updates + 1 == stage.epochs * stage.mini_batches:
                then()
            outs = gather(refs)
            policy, value = outs[:world], outs[world:]
            if not all(o["applied"] for o in outs):
                skipped += 1
                log.warning("%s step %d: non-finite loss or gradient (loss sum %s, grad norm %s): update skipped",
                            stage.name, step + 1, sum(o["loss_sum"] for o in policy), policy[0]["grad_norm"])
            n_updates += 1
            _merge(policy_sums, policy)
            _merge(value_sums, value)
            last = {"lr": policy[0]["lr"], "grad_norm": policy[0]["grad_norm"],
                    **({"value_grad_norm": value[0]["grad_norm"]} if value else {})}
    tokens = policy_sums.pop("tokens")
    ptx_nll = policy_sums.pop("ptx_nll_sum", 0.0) / max(1.0, policy_sums.pop("ptx_tokens", 0.0))
    out = {k: (v if k.endswith(("_max", "_min")) else v / tokens) for k, v in policy_sums.items() if k != "loss_sum"}
    out["loss"] = policy_sums["loss_sum"] / (tokens if objective.normaliser == "tokens" else len(samples) * stage.epochs)
    if ptx:
        out["ptx_nll"] = ptx_nll  # mean NLL per target token of the supervised batches
    if value_sums:
        out["value_loss"] = value_sums["value_loss_sum"] / value_sums["tokens"]
        out["value_clip_frac"] = value_sums["value_clip_frac"] / value_sums["tokens"]
    return {**out, **last, "skipped_updates": float(skipped), "updates": float(n_updates)}


def _example_length(e: Example) -> int:
    return len(e.input_ids)


def _merge(sums: dict[str, float], outs: list[dict[str, float]]) -> None:
    """Add the ranks' sums into `sums`; *_max / *_min keys keep the extreme instead."""
    for o in outs:
        for k, v in o.items():
            if k in ("lr", "grad_norm", "applied"):
                continue
            extreme = max if k.endswith("_max") else min if k.endswith("_min") else None
            sums[k] = extreme(sums.get(k, v), v) if extreme else sums.get(k, 0.0) + v


# ------------------------------------------------------------------------------------------ weight sync


@dataclass
class Push:
    """A weight push in flight: what the samplers and the learners answer about weights `version`."""

    version: int
    loads: list  # each sampler's update_weights: the version it now serves
    rest: list  # the other learner ranks' part of the state gather (ZeRO-3)
    learner_probe: list  # the probe on rank 0 (on every rank under ZeRO-3: gathers); rank 0's counts. Empty: no probe
    sampler_probes: list  # each sampler's (version served, log-probs)
    probe_seq: tuple[list[int], list[int]] | None = None  # the probe, until asked (ask_probes)
    actors: Actors | None = None

    def ask_probes(self) -> None:
        """Have the learner and the samplers score the probe, if not yet. The loop asks once the next samples are
        back: the probes then run while the verifier scores them, neither before nor during the sampling."""
        if self.probe_seq is not None:
            self.learner_probe, self.sampler_probes = _probes(self.actors, self.probe_seq)
            self.probe_seq = None


def _push_weights(actors: Actors, version: int, probe: tuple[list[int], list[int]] | None = None) -> Push:
    """Learners -> samplers through Ray's object store, without waiting: every rank gathers (ZeRO-3), rank 0 holds
    the weights, and each sampler loads them from that one object. A Ray actor runs its calls in the order they
    were made, so whatever is asked of the samplers next (the next step's sampling, the probe) runs on version
    `version`; `_check_push` reads the outcome."""
    refs = [lr.pushed_weights.remote() for lr in actors.learners]
    loads = [s.update_weights.remote(refs[0], version) for s in actors.samplers]  # they wait for rank 0's weights
    return Push(version, loads, refs[1:], [], [], probe, actors if probe is not None else None)


def _probes(actors: Actors, seq: tuple[list[int], list[int]]) -> tuple[list, list]:
    """The learner (every rank under ZeRO-3: its forward gathers) and every sampler score the probe sequence;
    returns their refs."""
    learners = actors.learners if actors.lockstep else actors.learners[:1]
    return [lr.probe.remote(*seq) for lr in learners], [s.probe.remote(*seq) for s in actors.samplers]


def _tolerance(stage: OnlineRLStage, dtype: str) -> float:
    """The parity probe's tolerance: the recipe's, else float32 1e-3 and half precision 0.25."""
    return stage.sync.parity_tolerance or (1e-3 if dtype == "float32" else 0.25)


def _settle(state: LoopState, tolerance: float) -> dict[str, float]:
    """Check the push in flight, if any (see _check_push); returns the probe's metrics."""
    push, state.pushed = state.pushed, None
    return _check_push(push, tolerance) if push is not None else {}


def _check_push(push: Push, tolerance: float) -> dict[str, float]:
    """Every sampler serves `push.version`, and (when probed) its log-probs of the probe sequence equal the
    learner's within `tolerance`; otherwise the run stops."""
    push.ask_probes()
    gather(push.rest)
    served = gather(push.loads)
    if any(v != push.version for v in served):
        raise WeightSyncError(f"weights version {push.version}: the samplers report versions {served} after the "
                              "push: a sampler ignored the update. The run stops rather than sample with stale "
                              "weights.")
    if not push.learner_probe:
        return {}
    learner_lp = gather(push.learner_probe)[0]
    worst = None
    for j, (version, lp) in enumerate(gather(push.sampler_probes)):
        require_version(version, push.version)
        report = parity_report(push.version, lp, learner_lp, tolerance)
        require_parity(report, f"sampler {j}")
        worst = report if worst is None or report.max_abs_diff > worst.max_abs_diff else worst
    return worst.metrics()


# ------------------------------------------------------------------------------------------ monitors


MONITOR_CHECKS = (  # (metric, threshold field, above?, what crossing it usually means)
    ("kl", "kl_max", True, "the policy is drifting far from the reference: lower optim.lr or raise the KL weight"),
    ("entropy", "entropy_min", False, "the policy is collapsing onto a few tokens: lower optim.lr or add an entropy bonus"),
    ("clip_frac", "clip_frac_max", True, "updates are too large for the trust region: lower optim.lr or fewer epochs"),
    ("is_ratio_max", "is_ratio_max", True,
     "samples are far off-policy for the learner (sampler/learner mismatch): set truncated_is or check dtypes"),
    ("log_z_max", "log_z_max", True, "the output logits are growing: set z_loss or lower optim.lr"),
)


def _report_monitors(stage: OnlineRLStage, row: dict[str, float], active: set[str], step: int) -> set[str]:
    """Warn when a monitor crosses its threshold (once per crossing) and note when it comes back; returns the
    monitors now over their thresholds."""
    alerts = dict(monitor_alerts(row, stage.monitors))  # metric -> message
    for key in alerts.keys() - active:
        log.warning("%s step %d: %s", stage.name, step, alerts[key])
    for key in active - alerts.keys():
        log.info("%s step %d: %s is back within its monitor threshold", stage.name, step, key)
    row["monitor_alerts"] = float(len(alerts))
    return set(alerts)


def monitor_alerts(row: dict[str, float], cfg: MonitorConfig) -> list[tuple[str, str]]:
    """(metric, plain-language warning) for each of the step's metrics that crossed a recipe threshold."""
    out = []
    for key, limit_name, above, meaning in MONITOR_CHECKS:
        limit = getattr(cfg, limit_name)
        value = row.get(key)
        if limit is None or value is None or not math.isfinite(value):
            continue
        if (value > limit) if above else (value < limit):
            out.append((key, f"{key} = {value:.4g} is {'above' if above else 'below'} monitors.{limit_name} = "
                             f"{limit:g}: {meaning}"))
    drift = row.get("length_drift")
    if cfg.length_drift_max is not None and drift is not None and abs(drift) > cfg.length_drift_max:
        out.append(("length_drift", f"mean response length moved {drift:+.0%} from the first step's "
                                    f"(monitors.length_drift_max = {cfg.length_drift_max:g}): watch for length "
                                    "hacking or truncation"))
    return out


# ------------------------------------------------------------------------------------------ actors, eval, save


def _critic_group(ctx: StageContext, demand: Demand, updates: int):
    """PPO's critic: a second learner group with a value head (full weights, its own optimizer), initialised from
    `critic.model`, else the reward model when the reward comes from one, else the policy (with a new head)."""
    stage: OnlineRLStage = ctx.stage
    critic = stage.critic or CriticConfig()
    return learner_group(ctx, ctx.resolve(_critic_source(ctx)), replace(stage, optim=critic.optim),
                         ctx.stage_dir / CRITIC_DIR, False, "critic (value head)", demand=demand, head="value",
                         lora=None, total_steps=updates)


def _critic_source(ctx: StageContext) -> str:
    return (ctx.stage.critic or CriticConfig()).model or ctx.stage.reward.reward_model or ctx.model_path


def _reward_models(ctx: StageContext, demand: Demand):
    cfg, recipe = ctx.recipe.cluster.reward_model, ctx.recipe
    path = ctx.resolve(ctx.stage.reward.reward_model)
    return spawn(RewardModelWorker, demand, [(path, recipe.model.dtype, max(1, int(cfg.cpus)), cfg.batch_size)] * cfg.actors)


def _evaluate(ctx: StageContext, actors: Actors, held_out: Problems, step: int) -> dict[str, float]:
    stage: OnlineRLStage = ctx.stage
    rows = held_out.rows.select(held_out.keep)
    m = evaluate_policy(actors.samplers, actors.verifiers, rows, [held_out.prompts[i] for i in held_out.keep],
                        verifier_name=ctx.recipe.data[stage.data].verifier,
                        greedy_tokens=stage.sampling.max_new_tokens, samples=0, pass_k=[], sampling=greedy(1),
                        batch_size=ctx.recipe.cluster.sampler.batch_size, seed=ctx.recipe.seed,
                        desc=f"{stage.name} eval @{step}")
    out = {"eval_pass@1": m["pass@1"], "eval_response_length": m["mean_completion_tokens"]}
    ctx.log(step, out)
    log.info("%s step %d held-out: %s", stage.name, step, format_metrics(out))
    return out


def _save(ctx: StageContext, actors: Actors, root: Path, step: int, metrics, state: LoopState) -> Path:
    """An atomic checkpoint: the policy (HF), the critic (HF, under critic/), optimizer states and the loop state."""
    def extra(tmp: Path) -> None:
        if actors.critics:
            gather([c.save.remote(str(tmp / CRITIC_DIR)) for c in actors.critics])
        (tmp / STATE_FILE).write_text(state.to_json())

    lcfg = ctx.recipe.cluster.learner
    return save_step(actors.learners, root, step, ctx.stage.keep_last, lcfg.actors, lcfg.zero_stage, metrics,
                     write_extra=extra)
