"""DPO-family losses, KTO, TR-DPO reference updates and reward-augmented data.

Expectations are hand-computed (closed forms at initialisation), optimised on a tabular bandit with a
known Bradley-Terry reward, or taken from TRL's own loss code run on the same log-prob tensors.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from posttrain.algorithms import dpo as D
from posttrain.algorithms.kto import KTOConfig, kto_loss, kto_reference_point
from posttrain.algorithms.logprobs import token_logprobs
from posttrain.algorithms.reward_augmented import reward_augment
from posttrain.algorithms.trdpo import TRDPOConfig, hard_update, should_update, soft_update, update_reference

f64 = torch.float64
LOG2 = math.log(2)


def _at_init(b: int = 5, seed: int = 0) -> D.PreferenceBatch:
    """policy == ref, with distinct chosen/rejected log-probs."""
    g = torch.Generator().manual_seed(seed)
    chosen = -torch.rand(b, generator=g, dtype=f64) * 40 - 1  # (B,)
    rejected = -torch.rand(b, generator=g, dtype=f64) * 40 - 1  # (B,)
    return D.PreferenceBatch(chosen.clone(), rejected.clone(), chosen.clone(), rejected.clone())


def _random(b: int = 6, seed: int = 1) -> D.PreferenceBatch:
    g = torch.Generator().manual_seed(seed)
    pc = -torch.rand(b, generator=g, dtype=f64) * 45 - 5
    pr = -torch.rand(b, generator=g, dtype=f64) * 45 - 5
    rc = pc + torch.randn(b, generator=g, dtype=f64) * 3
    rr = pr + torch.randn(b, generator=g, dtype=f64) * 3
    nc = torch.randint(3, 20, (b,), generator=g).to(f64)
    nr = torch.randint(3, 20, (b,), generator=g).to(f64)
    return D.PreferenceBatch(pc, pr, rc, rr, chosen_len=nc, rejected_len=nr)


def _from_margin(h: torch.Tensor) -> D.PreferenceBatch:
    """A batch whose margin is h itself, so autograd w.r.t. h is d loss / d h."""
    z = torch.zeros_like(h)
    return D.PreferenceBatch(h, z, z, z)


# ---------------------------------------------------------------- closed forms at initialisation


def test_dpo_is_log2_at_init_with_gradient_minus_beta_over_2():
    beta = 0.1
    assert torch.allclose(D.dpo_loss(_at_init(), D.DPOConfig(beta)), torch.full((5,), LOG2, dtype=f64), atol=0, rtol=1e-15)
    h = torch.zeros(4, dtype=f64, requires_grad=True)
    (grad,) = torch.autograd.grad(D.dpo_loss(_from_margin(h), D.DPOConfig(beta)).sum(), h)
    assert torch.allclose(grad, torch.full((4,), -beta / 2, dtype=f64), atol=1e-15)


def test_swapping_the_pair_gives_minus_log_sigmoid_of_minus_beta_h():
    b, beta = _random(), 0.1
    h = D.logratio_margin(b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected)
    swapped = D.PreferenceBatch(b.policy_rejected, b.policy_chosen, b.ref_rejected, b.ref_chosen)
    assert torch.allclose(D.dpo_loss(swapped, D.DPOConfig(beta)), -F.logsigmoid(-beta * h), atol=1e-14)
    assert torch.allclose(D.dpo_loss(b, D.DPOConfig(beta)), -F.logsigmoid(beta * h), atol=1e-14)


def test_ipo_at_init_is_one_over_four_tau_squared():
    for tau, expected in ((0.1, 25.0), (0.5, 1.0), (2.0, 1 / 16)):
        got = D.ipo_loss(_at_init(), D.IPOConfig(tau))
        assert torch.allclose(got, torch.full((5,), expected, dtype=f64), rtol=1e-12)


def test_exo_at_init_is_2_7612():
    eps = 1e-3
    got = D.exo_pair_loss(_at_init(), D.EXOConfig(beta=0.1, epsilon=eps))
    # q = 1/2: KL((1/2, 1/2) || (1-eps, eps)), written out independently of the implementation.
    closed = 0.5 * math.log(0.5 / (1 - eps)) + 0.5 * math.log(0.5 / eps)
    assert round(closed, 4) == 2.7612
    assert torch.allclose(got, torch.full((5,), closed, dtype=f64), atol=1e-14)
    assert round(got[0].item(), 4) == 2.7612


def test_exo_is_a_kl_so_it_is_non_negative_and_zero_at_q_equal_one_minus_eps():
    beta, eps = 0.1, 1e-3
    h_star = math.log((1 - eps) / eps) / beta  # sigma(beta h*) = 1 - eps
    h = torch.tensor([h_star, -30.0, 0.0, 30.0, 200.0], dtype=f64)
    loss = D.exo_pair_loss(_from_margin(h), D.EXOConfig(beta, eps))
    assert loss[0].abs() < 1e-12 and (loss >= -1e-15).all() and torch.isfinite(loss).all()


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_and_robust_dpo_are_log2_at_init_with_scaled_gradients(eps):
    beta = 0.1
    b0 = _at_init()

    def grads(fn, cfg):
        pc = b0.policy_chosen.clone().requires_grad_()
        pr = b0.policy_rejected.clone().requires_grad_()
        loss = fn(D.PreferenceBatch(pc, pr, b0.ref_chosen, b0.ref_rejected), cfg)
        return loss.detach(), torch.autograd.grad(loss.sum(), (pc, pr))

    _, (dpo_c, dpo_r) = grads(D.dpo_loss, D.DPOConfig(beta))
    assert torch.allclose(dpo_c, torch.full_like(dpo_c, -beta / 2)) and torch.allclose(dpo_r, -dpo_c)
    loss, (c, r) = grads(D.cdpo_loss, D.CDPOConfig(beta, eps))
    assert torch.allclose(loss, torch.full_like(loss, LOG2), atol=1e-15)
    assert torch.allclose(c, dpo_c * (1 - 2 * eps), atol=1e-15) and torch.allclose(r, dpo_r * (1 - 2 * eps), atol=1e-15)
    loss, (c, r) = grads(D.robust_dpo_loss, D.RobustDPOConfig(beta, eps))
    assert torch.allclose(loss, torch.full_like(loss, LOG2), atol=1e-15)
    assert torch.allclose(c, dpo_c / (1 - 2 * eps), atol=1e-15) and torch.allclose(r, dpo_r / (1 - 2 * eps), atol=1e-15)


def test_zero_noise_cdpo_and_robust_dpo_are_dpo():
    b = _random()
    dpo = D.dpo_loss(b, D.DPOConfig(0.2))
    assert torch.equal(D.cdpo_loss(b, D.CDPOConfig(0.2, 0.0)), dpo)
    assert torch.equal(D.robust_dpo_loss(b, D.RobustDPOConfig(0.2, 0.0)), dpo)


def test_robust_dpo_is_unbiased_under_symmetric_flips():
    # E over a label flipped with probability eps of the robust loss = clean DPO loss.
    b, beta, eps = _random(), 0.1, 0.2
    swapped = D.PreferenceBatch(b.policy_rejected, b.policy_chosen, b.ref_rejected, b.ref_chosen)
    cfg = D.RobustDPOConfig(beta, eps)
    expected = (1 - eps) * D.robust_dpo_loss(b, cfg) + eps * D.robust_dpo_loss(swapped, cfg)
    assert torch.allclose(expected, D.dpo_loss(b, D.DPOConfig(beta)), atol=1e-13)


def test_hdpo_alpha_one_is_dpo_exactly_and_alpha_not_one_moves_off_log2():
    b = _random()
    assert torch.equal(D.hdpo_loss(b, D.HDPOConfig(alpha=1.0, beta=0.1)), D.dpo_loss(b, D.DPOConfig(0.1)))
    b0 = _at_init()
    got = D.hdpo_loss(b0, D.HDPOConfig(alpha=0.9, beta=0.1))
    # At init h_alpha = (alpha - 1)(log pi(y_w) - log pi(y_l)), not 0.
    gap = b0.policy_chosen - b0.policy_rejected
    assert torch.allclose(got, -F.logsigmoid(0.1 * (0.9 - 1) * gap), atol=1e-15)
    assert ((got - LOG2).abs() > 1e-3).all()


def test_rpo_eta_zero_is_dpo_and_eta_adds_the_chosen_nll():
    b = _random()
    nll = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.1, 3.0], dtype=f64)
    b = D.PreferenceBatch(b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected, chosen_nll=nll)
    dpo = D.dpo_loss(b, D.DPOConfig(0.1))
    assert torch.equal(D.rpo_loss(b, D.RPOConfig(beta=0.1, eta=0.0)), dpo)
    assert torch.allclose(D.rpo_loss(b, D.RPOConfig(beta=0.1, eta=0.5)), dpo + 0.5 * nll, atol=1e-15)


def test_simpo_on_hand_numbers():
    # avg_w = -6/3 = -2, avg_l = -12/4 = -3; beta 2, gamma 1: logit = 2*(-2) - 2*(-3) - 1 = 1.
    # Second pair: avg_w = -5/5 = -1, avg_l = -2/2 = -1; logit = 0 - 1 = -1.
    b = D.PreferenceBatch(torch.tensor([-6.0, -5.0], dtype=f64), torch.tensor([-12.0, -2.0], dtype=f64),
                          chosen_len=torch.tensor([3.0, 5.0], dtype=f64), rejected_len=torch.tensor([4.0, 2.0], dtype=f64))
    got = D.simpo_loss(b, D.SimPOConfig(beta=2.0, gamma=1.0))
    expected = torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.exp(1))], dtype=f64)
    assert torch.allclose(got, expected, atol=1e-15)
    assert abs(got[0].item() - 0.31326168751822286) < 1e-15
    # The reference log-probs play no role.
    with_ref = D.PreferenceBatch(b.policy_chosen, b.policy_rejected, b.policy_chosen * 7, b.policy_rejected,
                                 chosen_len=b.chosen_len, rejected_len=b.rejected_len)
    assert torch.equal(D.simpo_loss(with_ref, D.SimPOConfig(2.0, 1.0)), got)


# ---------------------------------------------------------------- dispatch, metrics, validation


def test_preference_loss_dispatches_and_reports_metrics_on_hand_numbers():
    pc = torch.tensor([-1.0, -2.0], dtype=f64, requires_grad=True)
    b = D.PreferenceBatch(pc, torch.tensor([-3.0, -1.0], dtype=f64),
                          torch.tensor([-1.5, -1.0], dtype=f64), torch.tensor([-2.0, -2.0], dtype=f64))
    losses, m = D.preference_loss("dpo", D.DPOConfig(0.1), b)
    assert losses.shape == (2,) and losses.requires_grad
    assert torch.equal(losses, D.dpo_loss(b, D.DPOConfig(0.1)))
    # rewards/chosen = 0.1*[0.5, -1.0]; rewards/rejected = 0.1*[-1.0, 1.0]; margins [0.15, -0.2].
    assert m["rewards/chosen"] == pytest.approx(-0.025, abs=1e-15)
    assert m["rewards/rejected"] == pytest.approx(0.0, abs=1e-15)
    assert m["rewards/margin"] == pytest.approx(-0.025, abs=1e-15)
    assert m["rewards/accuracy"] == 0.5
    assert all(isinstance(v, float) for v in m.values())
    # IPO scales its implicit reward by tau; every registered loss runs through the dispatcher.
    _, m_ipo = D.preference_loss("ipo", D.IPOConfig(0.5), b)
    assert m_ipo["rewards/margin"] == pytest.approx(5 * -0.025, abs=1e-15)
    full = _random()
    full = D.PreferenceBatch(**{**full.__dict__, "chosen_nll": torch.ones(6, dtype=f64)})
    for name, cfg_cls in D.PAIRWISE_CONFIGS.items():
        cfg = cfg_cls(alpha=0.9) if name == "hdpo" else cfg_cls()
        out, metrics = D.preference_loss(name, cfg, full)
        assert out.shape == (6,) and torch.isfinite(out).all() and 0 <= metrics["rewards/accuracy"] <= 1
    assert set(D.PAIRWISE_LOSSES) == {"dpo", "cdpo", "rdpo", "ipo", "rpo", "hdpo", "exo", "simpo"}


def test_dispatch_and_batch_errors():
    b = _random()
    with pytest.raises(ValueError, match="unknown"):
        D.preference_loss("ppo", D.DPOConfig(), b)
    with pytest.raises(TypeError):
        D.preference_loss("ipo", D.DPOConfig(), b)
    with pytest.raises(ValueError, match="chosen_nll"):
        D.preference_loss("rpo", D.RPOConfig(), b)
    with pytest.raises(ValueError, match="ref_chosen"):
        D.dpo_loss(D.PreferenceBatch(b.policy_chosen, b.policy_rejected), D.DPOConfig())
    with pytest.raises(ValueError, match="shape"):
        D.PreferenceBatch(b.policy_chosen, b.policy_rejected.unsqueeze(1))


@pytest.mark.parametrize("make", [
    lambda: D.DPOConfig(beta=0.0), lambda: D.DPOConfig(beta=-1.0),
    lambda: D.CDPOConfig(label_smoothing=0.5), lambda: D.CDPOConfig(label_smoothing=-0.1),
    lambda: D.RobustDPOConfig(flip_rate=0.5), lambda: D.RobustDPOConfig(flip_rate=0.7),
    lambda: D.IPOConfig(tau=0.0), lambda: D.RPOConfig(eta=-1.0), lambda: D.HDPOConfig(alpha=0.0),
    lambda: D.EXOConfig(epsilon=0.0), lambda: D.EXOConfig(epsilon=0.5), lambda: D.SimPOConfig(gamma=-1.0),
    lambda: D.SimPOConfig(beta=0.0), lambda: KTOConfig(beta=0.0), lambda: KTOConfig(desirable_weight=0.0),
    lambda: TRDPOConfig(alpha=1.5), lambda: TRDPOConfig(tau=0), lambda: TRDPOConfig(tau=2.5),
    lambda: TRDPOConfig(mode="lerp"),
])
def test_configs_reject_out_of_range_values(make):
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------------------- tabular bandit

K = 4
LOG_REF = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=f64).log()


def _minimise(objective, theta: torch.Tensor, iters: int = 200) -> torch.Tensor:
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=iters, tolerance_grad=1e-13, tolerance_change=1e-16,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return theta.detach()


def _pair_batch(theta: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> D.PreferenceBatch:
    logp = torch.log_softmax(theta, 0)  # (K,)
    return D.PreferenceBatch(logp[i], logp[j], LOG_REF[i], LOG_REF[j])


def test_bandit_dpo_converges_to_reference_tilted_by_exp_r_over_beta():
    beta = 0.5
    r = torch.tensor([1.0, 0.0, 0.5, -0.5], dtype=f64)
    i, j = (t.flatten() for t in torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij"))
    keep = i != j
    i, j = i[keep], j[keep]  # all ordered pairs, labelled i > j ...
    w = torch.sigmoid(r[i] - r[j])  # ... with its Bradley-Terry probability

    def expected_loss(theta):
        return (w * D.dpo_loss(_pair_batch(theta, i, j), D.DPOConfig(beta))).mean()

    theta = _minimise(expected_loss, LOG_REF.clone().requires_grad_())
    target = torch.softmax(LOG_REF + r / beta, 0)
    err = (torch.softmax(theta, 0) - target).abs().max().item()
    assert err < 1e-8, err


def test_bandit_ipo_reaches_finite_margin_where_dpo_keeps_growing():
    # Deterministic chain 0 > 1 > 2 > 3 (adjacent pairs only, so every margin target is reachable).
    i, j = torch.arange(K - 1), torch.arange(1, K)
    tau = 0.1

    def margins(theta):
        b = _pair_batch(theta, i, j)
        return D.logratio_margin(b.policy_chosen, b.policy_rejected, b.ref_chosen, b.ref_rejected)

    theta = _minimise(lambda t: D.ipo_loss(_pair_batch(t, i, j), D.IPOConfig(tau)).mean(),
                      LOG_REF.clone().requires_grad_())
    h = margins(theta)
    assert torch.allclose(h, torch.full_like(h, 1 / (2 * tau)), atol=1e-8), h

    # cDPO also has a finite optimum, h* = log((1-eps)/eps)/beta.
    beta, eps = 0.5, 0.1
    theta = _minimise(lambda t: D.cdpo_loss(_pair_batch(t, i, j), D.CDPOConfig(beta, eps)).mean(),
                      LOG_REF.clone().requires_grad_())
    h = margins(theta)
    assert torch.allclose(h, torch.full_like(h, math.log((1 - eps) / eps) / beta), atol=1e-7), h

    # DPO has none: the margin keeps growing past IPO's target under plain gradient descent.
    theta = LOG_REF.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.1)
    seen = []
    for step in range(400):
        opt.zero_grad()
        D.dpo_loss(_pair_batch(theta, i, j), D.DPOConfig(0.1)).mean().backward()
        opt.step()
        if step % 100 == 99:
            seen.append(margins(theta.detach()).min().item())
    assert all(b > a for a, b in zip(seen, seen[1:])) and seen[-1] > 1 / (2 * tau), seen


# ---------------------------------------------------------------- TR-DPO


def _tiny_lm(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(7, 8), torch.nn.Linear(8, 7)).to(f64)


def _seq_logps(model, ids, mask):
    return (token_logprobs(model(ids), ids) * mask[:, 1:]).sum(-1)  # (N,)


def _tr_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (6, 5), generator=g)  # 3 chosen, then 3 rejected
    mask = torch.ones(6, 5, dtype=f64)
    mask[:, :2] = 0  # prompt
    return ids, mask


def _dpo_on(policy, ref, ids, mask, beta=0.1):
    lp = _seq_logps(policy, ids, mask)
    with torch.no_grad():
        lr = _seq_logps(ref, ids, mask)
    return D.dpo_loss(D.PreferenceBatch(lp[:3], lp[3:], lr[:3], lr[3:]), D.DPOConfig(beta))


def test_trdpo_alpha_zero_keeps_the_reference_fixed():
    ids, mask = _tr_batch()
    policy = _tiny_lm(0)
    ref = copy.deepcopy(policy)
    frozen = copy.deepcopy(ref)
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    for step in range(1, 5):
        opt.zero_grad()
        _dpo_on(policy, ref, ids, mask).mean().backward()
        opt.step()
        soft_update(ref.state_dict(), policy.state_dict(), alpha=0.0)
        for a, b in zip(ref.parameters(), frozen.parameters()):
            assert torch.equal(a, b)
    assert torch.equal(_dpo_on(policy, ref, ids, mask), _dpo_on(policy, frozen, ids, mask))
    assert not torch.equal(_dpo_on(policy, ref, ids, mask), torch.full((3,), LOG2, dtype=f64))


def test_trdpo_hard_update_resets_the_loss_to_log2_sawtooth():
    ids, mask = _tr_batch()
    cfg = TRDPOConfig(mode="hard", tau=3)
    policy = _tiny_lm(1)
    ref = copy.deepcopy(policy)
    opt = torch.optim.SGD(policy.parameters(), lr=2.0)
    losses = []
    for step in range(1, 8):
        opt.zero_grad()
        loss = _dpo_on(policy, ref, ids, mask)
        losses.append(loss.detach())
        loss.mean().backward()
        opt.step()
        if should_update(step, cfg):
            update_reference(ref.parameters(), policy.parameters(), cfg)
    log2 = torch.full((3,), LOG2, dtype=f64)
    # The loss before steps 1, 4 and 7 follows an update (or the start): exactly log 2.
    for k, loss in enumerate(losses, start=1):
        if k in (1, 4, 7):
            assert torch.equal(loss, -F.logsigmoid(torch.zeros(3, dtype=f64))) and torch.allclose(loss, log2, atol=1e-15)
        else:
            assert (loss - LOG2).abs().max() > 1e-4 and loss.mean() < LOG2  # it has been decreasing since


def test_soft_update_formula_on_state_dicts_and_alpha_one_is_hard():
    ref = {"w": torch.tensor([1.0, 2.0], dtype=f64), "n": torch.tensor(3)}
    pol = {"w": torch.tensor([3.0, -2.0], dtype=f64), "n": torch.tensor(5)}
    soft_update(ref, pol, alpha=0.25)
    assert torch.allclose(ref["w"], torch.tensor([1.5, 1.0], dtype=f64), atol=1e-15)  # 0.25*pol + 0.75*ref
    assert ref["n"].item() == 5  # integer buffers are copied, not mixed
    a = [torch.randn(3, dtype=f64)]
    b = [a[0].clone()]
    p = [torch.randn(3, dtype=f64)]
    soft_update(a, p, alpha=1.0)
    hard_update(b, p)
    assert torch.equal(a[0], p[0]) and torch.equal(b[0], p[0])
    with pytest.raises(ValueError):
        soft_update([torch.zeros(2)], [torch.zeros(3)], 0.5)
    # A module's state_dict shares storage with its parameters, so the module itself moves.
    ref_lm, pol_lm = _tiny_lm(0), _tiny_lm(1)
    mid = [(x + y) / 2 for x, y in zip(ref_lm.parameters(), pol_lm.parameters())]
    soft_update(ref_lm.state_dict(), pol_lm.state_dict(), alpha=0.5)
    assert all(torch.allclose(x, m, atol=1e-15) for x, m in zip(ref_lm.parameters(), mid))


def test_should_update_every_tau_steps():
    cfg = TRDPOConfig(alpha=0.6, tau=3)
    assert [s for s in range(0, 10) if should_update(s, cfg)] == [3, 6, 9]
    assert not any(should_update(s, TRDPOConfig(tau=math.inf)) for s in range(1, 1000))


# ---------------------------------------------------------------- KTO


def test_kto_at_init_is_half_lambda_per_example():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(6, generator=g, dtype=f64) * 30
    kl = -torch.rand(6, generator=g, dtype=f64) * 30
    desirable = torch.tensor([True, False, True, True, False, False])
    cfg = KTOConfig(beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    losses, m = kto_loss(lp, lp.clone(), desirable, kl, kl.clone(), cfg)
    assert torch.allclose(losses, torch.tensor([0.5, 0.75, 0.5, 0.5, 0.75, 0.75], dtype=f64), atol=1e-15)
    assert m["kl"] == 0.0 and m["rewards/chosen"] == 0.0


def test_kto_on_hand_numbers_with_detached_clamped_reference_point():
    policy = torch.tensor([-10.0, -20.0, -5.0], dtype=f64, requires_grad=True)
    ref = torch.tensor([-12.0, -19.0, -5.0], dtype=f64)
    desirable = torch.tensor([True, False, False])
    policy_kl = torch.tensor([-30.0, -40.0, -50.0], dtype=f64, requires_grad=True)
    ref_kl = torch.tensor([-33.0, -41.0, -52.0], dtype=f64)  # mean gap 2
    losses, m = kto_loss(policy, ref, desirable, policy_kl, ref_kl, KTOConfig(beta=0.5, undesirable_weight=2.0))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # r = [2, -1, 0], z0 = 2.
    expected = [1 - sig(0.5 * (2 - 2)), 2 * (1 - sig(0.5 * (2 + 1))), 2 * (1 - sig(0.5 * (2 - 0)))]
    assert torch.allclose(losses, torch.tensor(expected, dtype=f64), atol=1e-15)
    assert m["kl"] == 2.0 and m["rewards/chosen"] == 1.0 and m["rewards/rejected"] == pytest.approx(-0.25)
    losses.sum().backward()
    assert policy_kl.grad is None  # z0 is a baseline, not optimised
    assert kto_reference_point(ref_kl, policy_kl).item() == 0.0  # negative estimate clamps to 0


# ---------------------------------------------------------------- reward-augmented data


def test_reward_augment_makes_two_goal_conditioned_pairs():
    out = reward_augment("What is 2+2?", "4", "5", 9.0, 3.5)
    assert out == [
        {"prompt": "Target score: 9\nWhat is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Target score: 3.5\nWhat is 2+2?", "chosen": "5", "rejected": "4"},
    ]
    custom = reward_augment("Q", "a", "b", 1, 0, template="<score={score}> {prompt}")
    assert [e["prompt"] for e in custom] == ["<score=1> Q", "<score=0> Q"]
    with pytest.raises(ValueError):
        reward_augment("Q", "a", "b", 1, 0, template="no fields")


# ---------------------------------------------------------------- equality with TRL


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


class _LogProbLM:
    """Stands in for a model with TRL's fused LM head: returns fixed per-token log-probs."""

    training = True

    def __init__(self, per_token_by_input: dict[int, torch.Tensor]):
        self.per_token_by_input = per_token_by_input  # id(input_ids) -> (N, T-1)

    def __call__(self, input_ids, **_):
        lp = self.per_token_by_input[id(input_ids)]
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())


def _sequences(logps: torch.Tensor, lengths: torch.Tensor):
    """input_ids, completion mask and per-token log-probs (N, T-1) summing to logps over `lengths` tokens."""
    n, t = len(logps), int(lengths.max()) + 1
    mask = torch.zeros(n, t, dtype=torch.long)
    per_token = torch.zeros(n, t - 1, dtype=logps.dtype)
    for k, length in enumerate(lengths.long().tolist()):
        mask[k, 1:1 + length] = 1  # token 0 is the prompt
        per_token[k, 0] = logps[k]  # any split with this sum will do
    return torch.zeros(n, t, dtype=torch.long), mask, per_token


def _stub(**attrs):
    return SimpleNamespace(accelerator=_Accelerator(), aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1, **attrs)


def _trl_dpo(loss_type: str, beta: float, label_smoothing: float, b: D.PreferenceBatch) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss, run per pair on a stand-in `self` that carries only what it reads."""
    from trl import DPOTrainer

    out = []
    for k in range(len(b.policy_chosen)):
        logps = torch.stack([b.policy_chosen[k], b.policy_rejected[k]])
        lengths = torch.stack([b.chosen_len[k], b.rejected_len[k]])
        ids, mask, per_token = _sequences(logps, lengths)
        model = _LogProbLM({id(ids): per_token})
        self = _stub(model=model, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                     loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                     use_weighting=False, args=SimpleNamespace())
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
                  "ref_chosen_logps": b.ref_chosen[k:k + 1], "ref_rejected_logps": b.ref_rejected[k:k + 1]}
        out.append(DPOTrainer._compute_loss(self, model, inputs, return_outputs=False))
    return torch.stack(out)


@pytest.fixture(scope="module")
def trl_available():
    pytest.importorskip("trl")


@pytest.mark.parametrize("loss_type, label_smoothing, ours", [
    ("sigmoid", 0.0, lambda b: D.dpo_loss(b, D.DPOConfig(0.1))),
    # TRL 1.16's "sigmoid" ignores label_smoothing (see below); its label-smoothed sigmoid lives in "aot",
    # which sorts log-ratios across the batch. _trl_dpo calls it one pair at a time, so the sort is the
    # identity and "aot" is exactly cDPO.
    ("aot", 0.2, lambda b: D.cdpo_loss(b, D.CDPOConfig(0.1, 0.2))),
    ("robust", 0.2, lambda b: D.robust_dpo_loss(b, D.RobustDPOConfig(0.1, 0.2))),
    ("exo_pair", 1e-3, lambda b: D.exo_pair_loss(b, D.EXOConfig(0.1, 1e-3))),
])
def test_matches_trl_dpo_loss_types(trl_available, loss_type, label_smoothing, ours):
    b = _random()
    theirs = _trl_dpo(loss_type, 0.1, label_smoothing, b)
    mine = ours(b)
    assert torch.allclose(mine, theirs, atol=1e-6, rtol=0), (mine, theirs)


def test_trl_sigmoid_ignores_label_smoothing_so_it_is_not_cdpo(trl_available):
    # Older TRL applied label_smoothing (cDPO) inside "sigmoid"; 1.16 only reads it for robust, exo_pair
    # and aot. Our cDPO is the formula of Mitchell's note, checked in closed form above.
    b = _random()
    theirs = _trl_dpo("sigmoid", 0.1, 0.2, b)
    assert torch.allclose(D.dpo_loss(b, D.DPOConfig(0.1)), theirs, atol=1e-6, rtol=0)
    assert not torch.allclose(D.cdpo_loss(b, D.CDPOConfig(0.1, 0.2)), theirs, atol=1e-3)


def test_matches_trl_ipo_with_per_token_averaged_log_probs(trl_available):
    # TRL divides each log-ratio by the completion length before the square; our IPO is the paper's
    # summed form, so we feed it averaged log-probs to get TRL's numbers.
    b, tau = _random(), 0.1
    avg = D.PreferenceBatch(b.policy_chosen / b.chosen_len, b.policy_rejected / b.rejected_len,
                            b.ref_chosen / b.chosen_len, b.ref_rejected / b.rejected_len)
    theirs = _trl_dpo("ipo", tau, 0.0, b)
    assert torch.allclose(D.ipo_loss(avg, D.IPOConfig(tau)), theirs, atol=1e-6, rtol=0)
    assert not torch.allclose(D.ipo_loss(b, D.IPOConfig(tau)), theirs, atol=1e-3)  # summed form differs


def test_matches_trl_cpo_simpo(trl_available):
    from trl.experimental.cpo import CPOTrainer

    b = _random()
    self = _stub(alpha=0.0, loss_type="simpo", beta=2.0, simpo_gamma=1.0, label_smoothing=0.0)
    theirs, _, _ = CPOTrainer.cpo_loss(self, b.policy_chosen / b.chosen_len, b.policy_rejected / b.rejected_len)
    assert torch.allclose(D.simpo_loss(b, D.SimPOConfig(beta=2.0, gamma=1.0)), theirs, atol=1e-6, rtol=0)


def test_matches_trl_kto(trl_available):
    from trl import KTOTrainer

    g = torch.Generator().manual_seed(3)
    n = 6
    policy = -torch.rand(n, generator=g, dtype=f64) * 40 - 5
    ref = policy + torch.randn(n, generator=g, dtype=f64) * 4
    policy_kl = -torch.rand(n, generator=g, dtype=f64) * 40 - 5
    ref_kl = policy_kl - torch.rand(n, generator=g, dtype=f64) * 2  # positive KL estimate, so z0 > 0
    desirable = torch.tensor([True, False, True, False, False, True])
    lengths = torch.randint(3, 12, (n,), generator=g)
    ids, mask, per_token = _sequences(policy, lengths)
    kl_ids, kl_mask, kl_per_token = _sequences(policy_kl, lengths)
    model = _LogProbLM({id(ids): per_token, id(kl_ids): kl_per_token})
    cfg = KTOConfig(beta=0.3, desirable_weight=1.0, undesirable_weight=1.33)
    self = _stub(model=model, calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=cfg.beta,
                 desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
    self._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(self, m, batch)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_mask,
              "label": desirable, "ref_logps": ref, "ref_KL_logps": ref_kl}
    theirs = KTOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    mine, m = kto_loss(policy, ref, desirable, policy_kl, ref_kl, cfg)
    assert m["kl"] > 0
    assert abs(mine.mean().item() - theirs.item()) < 1e-12


def test_kto_on_pairs_is_the_mean_over_the_unpaired_examples():
    from posttrain.algorithms.kto import kto_pair_loss

    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr, pkl, rkl = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(6))
    cfg = KTOConfig(beta=0.3, desirable_weight=1.0, undesirable_weight=1.33)
    pairs, _ = kto_pair_loss(pc, pr, rc, rr, pkl, rkl, cfg)
    desirable = torch.tensor([True] * 5 + [False] * 5)
    unpaired, _ = kto_loss(torch.cat([pc, pr]), torch.cat([rc, rr]), desirable, pkl, rkl, cfg)
    assert pairs.mean().item() == pytest.approx(unpaired.mean().item(), abs=1e-12)
    at_init, _ = kto_pair_loss(pc, pr, pc, pr, pkl, pkl, cfg)  # policy == reference: r = 0, z0 = 0
    assert at_init.tolist() == pytest.approx([(1.0 + 1.33) / 4] * 5, abs=1e-12)


def test_reward_augmented_rows_condition_plain_and_chat_prompts():
    import json as _json

    from posttrain.algorithms.reward_augmented import augment_pair_row

    row = {"id": "r1", "prompt": "Q?", "chosen": "good", "rejected": "meh", "messages": None,
           "score_chosen": 9.0, "score_rejected": 6.5}
    w, l = augment_pair_row(row)
    assert (w["id"], w["prompt"], w["chosen"], w["rejected"]) == ("r1/w", "Target score: 9\nQ?", "good", "meh")
    assert (l["id"], l["prompt"], l["chosen"], l["rejected"]) == ("r1/l", "Target score: 6.5\nQ?", "meh", "good")
    chat = {**row, "prompt": "", "messages": _json.dumps([{"role": "system", "content": "be kind"},
                                                          {"role": "user", "content": "Q?"}])}
    w, l = augment_pair_row(chat, "[{score:g}] {prompt}")
    assert _json.loads(w["messages"])[1] == {"role": "user", "content": "[9] Q?"} and w["prompt"] == ""
    assert _json.loads(l["messages"]) == [{"role": "system", "content": "be kind"}, {"role": "user", "content": "[6.5] Q?"}]


def test_xpo_bonus_is_alpha_times_the_reference_samples_log_prob():
    pc = torch.tensor([-10.0, -4.0], dtype=f64, requires_grad=True)
    pr = torch.tensor([-6.0, -8.0], dtype=f64, requires_grad=True)
    bonus = D.xpo_bonus(pc, pr, alpha=1e-2)
    assert bonus.tolist() == pytest.approx([-0.08, -0.06], abs=1e-12)  # 0.01 * mean of the pair's two log-probs
    bonus.sum().backward()
    assert pc.grad.tolist() == [0.005, 0.005] and pr.grad.tolist() == [0.005, 0.005]  # descent lowers log pi(y~)
    assert D.xpo_bonus(pc, pr, alpha=0.0).tolist() == [0.0, 0.0]  # alpha = 0: online DPO
