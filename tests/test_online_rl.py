"""The online-RL learner and sampler paths in one process (torch backend): the update does not depend on how a
minibatch is split into micro-batches, a non-finite loss skips the update, the weight push carries LoRA merged in,
and after a push the sampler and the learner agree on log-probs while a sampler that missed it does not."""

from __future__ import annotations

import pytest
import torch

from posttrain.algorithms.rl_objective import RLObjective
from posttrain.algorithms.rl_config import GRPOConfig, PPOConfig
from posttrain.data.batching import Example, Packing, RLSample, collate, collate_rl
from posttrain.models.weights import parity_report
from posttrain.recipe.schema import LoraConfig, OptimConfig
from posttrain.workers.learner import LearnerSpec, LearnerWorker
from posttrain.workers.sampler import SamplerWorker

PROMPTS = [[1, 10, 11, 12], [1, 13, 14], [1, 15], [1, 16, 17, 18, 19]]
COMPLETIONS = [[20, 21, 2], [22, 23, 24, 25, 2], [26, 2], [27, 28, 29, 2]]
ADVANTAGES = [1.0, -0.5, 0.25, -1.0]


def _learner(model, gas: int, mbs: int, lora=None, beta=0.0) -> LearnerWorker:
    # eps=1: the first Adam step is ~lr * g, not lr * sign(g), so float noise in near-zero gradients stays small
    spec = LearnerSpec(model_path=str(model), dtype="float32", lora=lora, optim=OptimConfig(lr=1e-2, warmup_steps=0, eps=1.0),
                       total_steps=10, micro_batches_per_step=gas, micro_batch_size=mbs, backend="torch", seed=0,
                       live_reference=beta > 0)
    w = LearnerWorker(0, 1, spec)
    w.setup("127.0.0.1", 0)
    return w


def _samples(learner: LearnerWorker, advantages=ADVANTAGES) -> list[RLSample]:
    """On-policy samples: the sampler log-probs are the learner's own."""
    return [RLSample(p, c, learner.probe(p, c), advantages=[a] * len(c))
            for p, c, a in zip(PROMPTS, COMPLETIONS, advantages)]


def _totals(samples):
    return {"seqs": float(len(samples)), "tokens": float(sum(len(s.completion) for s in samples))}


def _params(w: LearnerWorker) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in w.model.named_parameters()}


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_update_is_the_same_for_any_micro_batch_split(tiny_model, aggregation):
    obj = RLObjective("grpo", GRPOConfig(beta=0.04, aggregation=aggregation))
    one = _learner(tiny_model, gas=1, mbs=4, beta=0.04)
    two = _learner(tiny_model, gas=2, mbs=2, beta=0.04)
    samples = _samples(one)
    out1 = one.rl_step(0, [collate_rl(samples, 0, None)], _totals(samples), obj)
    out2 = two.rl_step(0, [collate_rl(samples[:1], 0, 32), collate_rl(samples[1:], 0, 32)], _totals(samples), obj)
    assert out1["applied"] == out2["applied"] == 1.0
    assert out1["grad_norm"] == pytest.approx(out2["grad_norm"], rel=1e-5)
    assert out1["loss_sum"] == pytest.approx(out2["loss_sum"], rel=1e-5, abs=1e-7)
    for (name, a), b in zip(_params(one).items(), _params(two).values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # metrics come back as sums over tokens (the driver divides once over all ranks); extremes as extremes
    assert out1["kl"] == 0.0 and out1["ratio_mean"] == pytest.approx(out1["tokens"]) and out1["tokens"] == 14
    assert out1["is_ratio_max"] == pytest.approx(1.0, abs=1e-5)


def test_micro_batches_sent_as_samples_are_collated_by_the_learner(tiny_model):
    """The loop sends samples and the packing (lists cross Ray faster than tensors): the same update as the batch
    collated beforehand, shared-prefix layout included; samples without a packing are refused."""
    obj = RLObjective("grpo", GRPOConfig(beta=0.04))
    packing = Packing(pad_id=0, shared_prefix=True)
    given, collating = _learner(tiny_model, gas=1, mbs=4, beta=0.04), _learner(tiny_model, gas=1, mbs=4, beta=0.04)
    samples = _samples(given)
    out1 = given.rl_step(0, [packing.batch(samples)], _totals(samples), obj)
    out2 = collating.rl_step(0, [samples], _totals(samples), obj, packing=packing)
    assert out1["loss_sum"] == out2["loss_sum"] and out1["grad_norm"] == out2["grad_norm"]
    for (name, a), b in zip(_params(given).items(), _params(collating).values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="need the packing"):
        collating.rl_step(1, [samples], _totals(samples), obj)


def test_ppo_ptx_adds_coef_times_the_sft_gradient_for_any_split(tiny_model):
    """With zero advantages the PPO surrogate has no gradient, so the update is the ptx term alone: at ptx_coef 1 it
    is exactly an SFT step on the same sequences, at 0.5 its gradient norm halves, and splitting the RL and ptx
    sequences into two micro-batches changes nothing."""
    lm = [Example(p + c, len(p)) for p, c in zip(PROMPTS[::-1], COMPLETIONS)]  # other pairings than the RL samples
    sft = _learner(tiny_model, gas=1, mbs=4)
    batch = collate(lm, 0)
    sft_out = sft.train_step(0, [batch], batch.n_target_tokens)
    runs = {}
    for coef, gas in ((1.0, 1), (0.5, 1), (0.5, 2)):
        w = _learner(tiny_model, gas=gas, mbs=4 // gas)
        samples = _samples(w, advantages=[0.0] * 4)
        rl = [collate_rl(samples, 0, None)] if gas == 1 else [collate_rl(samples[:3], 0, 32), collate_rl(samples[3:], 0, 32)]
        ptx = [batch] if gas == 1 else [collate(lm[:1], 0), collate(lm[1:], 0)]
        totals = {**_totals(samples), "ptx_tokens": float(batch.n_target_tokens)}
        out = w.rl_step(0, rl, totals, RLObjective("ppo", ppo=PPOConfig(ptx_coef=coef)), ptx)
        assert out["applied"] == 1.0 and out["ptx_tokens"] == batch.n_target_tokens == 14
        assert out["ptx_nll_sum"] == pytest.approx(sft_out["nll_sum"], rel=1e-6)
        runs[coef, gas] = out, _params(w)
    assert runs[1.0, 1][0]["grad_norm"] == pytest.approx(sft_out["grad_norm"], rel=1e-6)
    for (name, a), b in zip(_params(sft).items(), runs[1.0, 1][1].values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    assert runs[0.5, 1][0]["grad_norm"] == pytest.approx(0.5 * sft_out["grad_norm"], rel=1e-5)
    assert runs[0.5, 2][0]["grad_norm"] == pytest.approx(runs[0.5, 1][0]["grad_norm"], rel=1e-5)
    for (name, a), b in zip(runs[0.5, 1][1].items(), runs[0.5, 2][1].values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_identical_advantages_move_nothing_and_nan_skips_the_step(tiny_model):
    obj = RLObjective("grpo", GRPOConfig(beta=0.0))
    w = _learner(tiny_model, gas=1, mbs=4)
    before = _params(w)
    samples = _samples(w, advantages=[0.0] * 4)  # a group with equal rewards: zero advantages
    out = w.rl_step(0, [collate_rl(samples, 0, None)], _totals(samples), obj)
    assert out["applied"] == 1.0 and out["grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in _params(w).items())
    samples = _samples(w, advantages=[1.0, float("nan"), 0.0, 0.0])
    out = w.rl_step(1, [collate_rl(samples, 0, None)], _totals(samples), obj)
    assert out["applied"] == 0.0  # non-finite gradient: skipped, weights untouched
    assert all(torch.equal(before[k], v) for k, v in _params(w).items())


def test_weight_push_merges_lora_and_the_probe_tells_a_stale_sampler(tiny_model):
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    w = _learner(tiny_model, gas=1, mbs=4, lora=lora)
    samples = _samples(w, advantages=[2.0, -2.0, 2.0, -2.0])
    for step in range(3):  # a few large steps so the adapters are far from zero
        assert w.rl_step(step, [collate_rl(samples, 0, None)], _totals(samples), RLObjective("grpo"))["applied"]
    state = w.policy_state()
    assert not any("lora" in k or "base_layer" in k for k in state)
    fresh, stale = SamplerWorker(str(tiny_model)), SamplerWorker(str(tiny_model))
    assert fresh.update_weights(state, 3) == 3
    prompt, completion = PROMPTS[0], COMPLETIONS[0]
    learner_lp = w.probe(prompt, completion)
    version, lp = fresh.probe(prompt, completion)
    report = parity_report(version, lp, learner_lp, 1e-3)
    assert version == 3 and report.ok and report.max_abs_diff < 1e-5
    stale_report = parity_report(3, stale.probe(prompt, completion)[1], learner_lp, 1e-3)
    assert not stale_report.ok  # the sampler that missed the push is told apart
    # independently: peft's own merge gives the same weights as the push
    peft_merged = w.model.merge_and_unload()
    for k, v in peft_merged.state_dict().items():
        if k in state:
            torch.testing.assert_close(state[k], v, msg=k)
