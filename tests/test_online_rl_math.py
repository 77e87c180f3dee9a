"""PPO (PPO-max), GRPO, RLOO, RLVR shaping, KL estimators and running statistics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from posttrain.algorithms.grpo import GRPOConfig, group_advantages, grpo_loss, rloo_advantages, rlvr_reward
from posttrain.algorithms.kl import kl_k1, kl_k2, kl_k3, masked_mean
from posttrain.algorithms.ppo import PPOConfig, gae, policy_loss, token_rewards, value_loss, whiten
from posttrain.algorithms.running_stats import RunningMoments

f64 = torch.float64


# ------------------------------------------------------------------ GRPO / RLOO
def test_group_advantages_by_hand_sum_to_zero_and_guard_zero_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=f64)
    a = group_advantages(r, 4, eps=0.0)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert a.tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0], abs=1e-12)
    assert a.view(2, 4).sum(-1).tolist() == pytest.approx([0, 0], abs=1e-12)
    # invariant to r -> a r + b with a > 0 (eps = 0 makes it exact)
    assert group_advantages(3 * r - 7, 4, eps=0.0).tolist() == pytest.approx(a.tolist(), abs=1e-12)
    assert group_advantages(r, 4, scale_by_std=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]


def test_rloo_is_leave_one_out_and_k_over_k_minus_1_times_centred():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=f64)
    a = rloo_advantages(r, 4)
    assert a.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], abs=1e-12)  # 1 - (0+0+1)/3, 0 - 2/3
    assert a.tolist() == pytest.approx((4 / 3 * (r - r.mean())).tolist(), abs=1e-12)
    assert a.sum().item() == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError):
        rloo_advantages(r, 1)


def test_grpo_identical_rewards_give_zero_gradient():
    logp = torch.randn(4, 3, dtype=f64, requires_grad=True)
    adv = group_advantages(torch.full((4,), 0.7, dtype=f64), 4)
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, torch.ones(4, 3), GRPOConfig(beta=0.0))
    loss.backward()
    assert torch.count_nonzero(logp.grad) == 0


def test_grpo_aggregation_and_kl_term_by_hand():
    logp = torch.zeros(2, 2, dtype=f64)
    mask = torch.tensor([[1, 0], [1, 1]])
    adv = torch.tensor([1.0, -1.0], dtype=f64)
    # ratio 1: per-token loss -A: sample 0 -> [-1], sample 1 -> [1, 1]
    seq, _ = grpo_loss(logp, logp, None, adv, mask, GRPOConfig(beta=0.0))
    tok, _ = grpo_loss(logp, logp, None, adv, mask, GRPOConfig(beta=0.0, aggregation="token_mean"))
    assert seq.item() == pytest.approx((-1 + 1) / 2) and tok.item() == pytest.approx((-1 + 1 + 1) / 3)
    ref = torch.full((2, 2), math.log(2), dtype=f64)  # pi_ref = 2 pi: k3 = 2 - 1 - ln 2 on every token
    with_kl, m = grpo_loss(logp, logp, ref, adv, mask, GRPOConfig(beta=0.1))
    assert with_kl.item() == pytest.approx(0.1 * (1 - math.log(2)), abs=1e-12)
    assert m["kl"] == pytest.approx(1 - math.log(2), abs=1e-12)
    assert grpo_loss(logp, logp, logp, adv, mask, GRPOConfig(beta=0.1))[1]["kl"] == 0.0  # D_KL(pi_ref) = 0


def test_grpo_one_update_per_rollout_is_reinforce_with_a_group_baseline():
    logp = torch.randn(2, 3, dtype=f64, requires_grad=True)
    adv = torch.tensor([0.5, -2.0], dtype=f64)
    grpo_loss(logp, logp.detach(), None, adv, torch.ones(2, 3), GRPOConfig(beta=0.0))[0].backward()
    expected = (-adv / 3 / 2).unsqueeze(-1).expand(2, 3)  # -A / |o_i| / G on every token
    torch.testing.assert_close(logp.grad, expected)


def test_rlvr_reward_penalises_missing_eos():
    correct = torch.tensor([True, False, True, False])
    finished = torch.tensor([True, True, False, False])
    assert rlvr_reward(correct, finished).tolist() == [10.0, 0.0, -10.0, -10.0]
    assert rlvr_reward(correct, finished, scale=1.0, no_eos_penalty=0.0).tolist() == [1.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------ KL estimators
def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.25)], dtype=f64), torch.tensor([math.log(0.5)], dtype=f64)
    d = math.log(0.25) - math.log(0.5)
    assert kl_k1(logp, ref).item() == pytest.approx(d)
    assert kl_k2(logp, ref).item() == pytest.approx(d * d / 2)
    assert kl_k3(logp, ref).item() == pytest.approx(2 - 1 - math.log(2))  # pi_ref/pi - log(pi_ref/pi) - 1
    x = torch.randn(100, dtype=f64)
    assert (kl_k3(x, torch.randn(100, dtype=f64)) >= 0).all() and kl_k3(x, x).abs().max() == 0


def test_k1_and_k3_are_unbiased_for_the_kl_on_policy_samples():
    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=f64), torch.tensor([0.2, 0.2, 0.6], dtype=f64)
    exact = (p * (p / q).log()).sum().item()
    for est in (kl_k1, kl_k3):  # E_{x~p}[estimator] computed exactly over the support
        assert (p * est(p.log(), q.log())).sum().item() == pytest.approx(exact, abs=1e-12)


# ------------------------------------------------------------------ PPO
def test_first_minibatch_gradient_is_minus_advantage_times_grad_logp():
    logp = torch.randn(2, 3, dtype=f64, requires_grad=True)
    adv = torch.randn(2, 3, dtype=f64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, m = policy_loss(logp, logp.detach(), adv, mask, clip_eps=0.2)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * mask / mask.sum())  # token mean of -A log pi
    assert m["clip_frac"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0)


def test_surrogate_clips_beyond_one_plus_eps():
    old = torch.zeros(1, 2, dtype=f64)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], dtype=f64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]], dtype=f64)
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 2), clip_eps=0.2)
    # token 0: min(1.5, 1.2) * 1 = 1.2; token 1: min(-0.5, -0.8) = -0.8  ->  loss = -(1.2 - 0.8) / 2
    assert loss.item() == pytest.approx(-(1.2 - 0.8) / 2) and m["clip_frac"] == 1.0
    loss.backward()
    assert logp.grad.abs().max() == 0  # both clipped: no gradient


def test_value_clipping_acts_only_beyond_the_clip():
    returns, old = torch.tensor([[1.0, 1.0]], dtype=f64), torch.tensor([[0.0, 0.0]], dtype=f64)
    mask = torch.ones(1, 2)
    near = torch.tensor([[0.1, -0.15]], dtype=f64)  # |V - V_old| <= 0.2
    assert value_loss(near, old, returns, mask, 0.2)[0].item() == pytest.approx(0.5 * ((0.9**2 + 1.15**2) / 2))
    far = torch.tensor([[0.5, 1.6]], dtype=f64)  # clip(V) = 0.2 for both
    loss, m = value_loss(far, old, returns, mask, 0.2)
    # token 0: max(0.25, 0.64) = 0.64 (clip acts); token 1: max(0.36, 0.64) = 0.64
    assert loss.item() == pytest.approx(0.5 * 0.64) and m["value_clip_frac"] == 1.0
    assert value_loss(far, old, returns, mask, None)[0].item() == pytest.approx(0.5 * (0.25 + 0.36) / 2)


def test_gae_with_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, -0.2, 0.0, 0.0]], dtype=f64)
    values = torch.tensor([[0.2, 0.5, 0.7, 9.0], [0.1, 0.3, 9.0, 9.0]], dtype=f64)  # 9 = padding, must not leak
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.5, 0.3, 0.0], [0.2, -0.5, 0.0, 0.0]], dtype=f64))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.3, -0.2, 0.0, 0.0]], dtype=f64))
    adv0, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)  # lambda 0: one-step TD errors
    assert adv0[0].tolist() == pytest.approx([0.5 - 0.2, 0.7 - 0.5, 1.0 - 0.7, 0.0], abs=1e-12)


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_on_all():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]], dtype=f64)
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, 0.0]], dtype=f64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    r = token_rewards(torch.tensor([5.0, -1.0], dtype=f64), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.0, 0.1 + 5.0], [0.0, -0.1 - 1.0, 0.0]], dtype=f64))


def test_whiten_gives_zero_mean_unit_variance_on_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]], dtype=f64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0, abs=1e-9)
    assert masked_mean(w**2, mask).item() == pytest.approx(1, abs=1e-6) and w[1, 1:].abs().max() == 0


def test_ppo_config_defaults_follow_ppo_max():
    c = PPOConfig()
    assert (c.clip_eps, c.value_clip, c.gamma, c.lam, c.reward_norm) == (0.2, 0.2, 1.0, 0.95, True)
    assert (c.whiten_advantages, c.entropy_coef, c.ptx_coef) == (False, 0.0, 0.0)
    with pytest.raises(ValueError):
        PPOConfig(kl_estimator="k9")


# ------------------------------------------------------------------ running statistics
def test_welford_equals_numpy_over_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3, 2, size=n) for n in (1, 7, 50, 3)]
    rm = RunningMoments()
    for b in batches:
        rm.update(torch.tensor(b))
    allv = np.concatenate(batches)
    assert rm.count == len(allv)
    assert rm.mean == pytest.approx(allv.mean(), abs=1e-12) and rm.var == pytest.approx(allv.var(), abs=1e-10)
    r = torch.tensor([100.0, allv.mean()], dtype=f64)
    assert rm.normalize(r, clip=10.0).tolist() == pytest.approx([10.0, 0.0], abs=1e-9)  # clipped, centred
    again = RunningMoments()
    again.load_state_dict(rm.state_dict())
    assert again == rm


# ------------------------------------------------------------------ unusable rewards, shaping, off-policy weights
def test_group_statistics_leave_out_unusable_rewards():
    from posttrain.algorithms.grpo import no_eos_reward

    r = torch.tensor([1.0, 0.0, float("nan"), 1.0, 5.0, 5.0, 5.0, 7.0], dtype=f64)
    valid = torch.tensor([True, True, True, True, True, True, True, False])
    a = group_advantages(r, 4, eps=0.0, valid=valid)
    # group 1: NaN left out -> {1, 0, 1}: mean 2/3, unbiased std sqrt(1/3)
    s = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)
    assert a[:4].tolist() == pytest.approx([(1 / 3) / s, -(2 / 3) / s, 0.0, (1 / 3) / s])
    assert a[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # the 7 is left out: the rest are equal (zero-std guard)
    b = rloo_advantages(r, 4, valid)
    assert b[:4].tolist() == pytest.approx([1 - 0.5, 0 - 1.0, 0.0, 1 - 0.5])  # baselines over the other valid ones
    assert b[4:].tolist() == [0.0, 0.0, 0.0, 0.0]
    lone = torch.tensor([1.0, float("nan")], dtype=f64)  # one usable sample: no baseline, no signal
    assert group_advantages(lone, 2).tolist() == [0.0, 0.0] and rloo_advantages(lone, 2).tolist() == [0.0, 0.0]
    finished = torch.tensor([True, False])
    assert no_eos_reward(torch.tensor([0.7, 0.7]), finished, -1.0).tolist() == pytest.approx([0.7, -1.0])
    assert no_eos_reward(torch.tensor([0.7, 0.7]), finished, None).tolist() == pytest.approx([0.7, 0.7])


def test_importance_weights_measure_and_truncate():
    from posttrain.algorithms.importance import importance_weights

    learner = torch.tensor([[math.log(0.5), math.log(0.4), 0.0]], dtype=f64)
    sampler = torch.tensor([[math.log(0.25), math.log(0.4), -5.0]], dtype=f64)
    mask = torch.tensor([[1, 1, 0]])
    w, m = importance_weights(learner, sampler, mask, cap=None)
    assert w.tolist() == [[1.0, 1.0, 1.0]]  # measured only
    assert m["is_ratio_max"] == pytest.approx(2.0) and m["is_ratio_min"] == pytest.approx(1.0)
    assert m["is_ratio_mean"] == pytest.approx(1.5) and m["is_logratio_abs_mean"] == pytest.approx(math.log(2) / 2)
    w, m = importance_weights(learner, sampler, mask, cap=1.5)
    assert w[0, :2].tolist() == pytest.approx([1.5, 1.0]) and m["is_truncated_frac"] == 0.5


def test_rl_loss_sums_split_into_micro_batches_give_the_batch_mean():
    """The learner divides each micro-batch's loss sum by the minibatch's count: any split gives the same loss."""
    from posttrain.algorithms.rl_config import PPOConfig
    from posttrain.algorithms.rl_objective import RLObjective, rl_loss

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 5, generator=g, dtype=f64)
    mask = (torch.arange(5) < torch.tensor([5, 3, 4, 1, 5, 2]).unsqueeze(-1)).to(f64)
    adv = torch.randn(6, generator=g, dtype=f64)
    ref = logp - 0.1 * torch.rand(6, 5, generator=g, dtype=f64)
    zeros = torch.zeros_like(logp)
    for obj in (RLObjective("grpo"), RLObjective("grpo", GRPOConfig(aggregation="token_mean")),
                RLObjective("ppo", ppo=PPOConfig(entropy_coef=0.01))):
        a = adv if obj.algorithm != "ppo" else adv.unsqueeze(-1).expand(6, 5)
        r = None if obj.algorithm == "ppo" else ref
        whole, _ = rl_loss(obj, logp, mask, logp, logp, a, r, zeros + 0.5, zeros)
        parts = [rl_loss(obj, logp[s], mask[s], logp[s], logp[s], a[s], None if r is None else r[s], zeros[s] + 0.5,
                         zeros[s])[0] for s in (slice(0, 2), slice(2, 6))]
        count = 6 if obj.normaliser == "seqs" else mask.sum().item()
        assert (sum(parts) / count).item() == pytest.approx(whole.item() / count, abs=1e-12)
        if obj.algorithm == "grpo" and obj.grpo.aggregation == "sequence_mean":
            expect, _ = grpo_loss(logp, logp, ref, adv, mask, obj.grpo)
            assert whole.item() / 6 == pytest.approx(expect.item(), abs=1e-12)  # the paper's loss, unchanged


def test_monitors_say_plainly_what_crossed():
    from posttrain.loops.online_rl import monitor_alerts
    from posttrain.recipe.schema import MonitorConfig

    cfg = MonitorConfig(kl_max=0.1, entropy_min=0.2, clip_frac_max=0.3, length_drift_max=0.5, is_ratio_max=3.0,
                        log_z_max=20.0)
    calm = {"kl": 0.05, "entropy": 0.5, "clip_frac": 0.1, "length_drift": 0.2, "is_ratio_max": 1.1, "log_z_max": 12.0}
    assert monitor_alerts(calm, cfg) == []
    hot = {"kl": 0.25, "entropy": 0.01, "clip_frac": 0.1, "length_drift": -0.6, "is_ratio_max": 1.1,
           "log_z_max": float("nan")}
    alerts = dict(monitor_alerts(hot, cfg))
    assert list(alerts) == ["kl", "entropy", "length_drift"]
    assert alerts["kl"].startswith("kl = 0.25 is above monitors.kl_max = 0.1: the policy is drifting")
    assert alerts["entropy"].startswith("entropy = 0.01 is below monitors.entropy_min = 0.2")
    assert "moved -60%" in alerts["length_drift"]
    assert monitor_alerts(hot, MonitorConfig(kl_max=None, entropy_min=None, length_drift_max=None)) == []
