"""Bradley-Terry reward-model loss: hand-computed values, gradients, and recovery of a known reward."""

import math

import pytest
import torch

from posttrain.algorithms.reward_model import RewardModelConfig, bradley_terry_loss, pairwise_accuracy


def test_values_by_hand():
    rc, rr = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    losses, m = bradley_terry_loss(rc, rr, RewardModelConfig())
    # -log sigma(d) = log(1 + e^-d): d = 0, 2, -2
    assert losses.tolist() == pytest.approx([math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))], abs=1e-6)
    assert m["accuracy"] == pytest.approx((0.5 + 1 + 0) / 3) and m["margin"] == pytest.approx(0.0)
    centred, _ = bradley_terry_loss(rc, rr, RewardModelConfig(center_coefficient=0.01))
    assert (centred - losses).tolist() == pytest.approx([0.0, 0.01 * 4, 0.0], abs=1e-7)


def test_gradient_is_sigmoid_of_the_wrong_order():
    rc = torch.tensor([0.3, -1.2], requires_grad=True)
    rr = torch.tensor([0.1, 0.4], requires_grad=True)
    bradley_terry_loss(rc, rr, RewardModelConfig())[0].sum().backward()
    d = (rc - rr).detach()
    assert rc.grad.tolist() == pytest.approx((-torch.sigmoid(-d)).tolist(), abs=1e-6)  # d/dr_w = -(1 - sigma(d))
    assert rr.grad.tolist() == pytest.approx(torch.sigmoid(-d).tolist(), abs=1e-6)


def test_fitting_recovers_a_known_reward_up_to_a_constant():
    """Pairs drawn from a Bradley-Terry model with rewards r*: the maximum-likelihood r is r* + c."""
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([0.0, 1.0, -0.5, 2.0])
    i, j = torch.randint(0, 4, (20000,), generator=g), torch.randint(0, 4, (20000,), generator=g)
    keep = i != j
    i, j = i[keep], j[keep]
    first_wins = torch.rand(len(i), generator=g) < torch.sigmoid(true[i] - true[j])
    w, l = torch.where(first_wins, i, j), torch.where(first_wins, j, i)
    r = torch.zeros(4, requires_grad=True)
    opt = torch.optim.LBFGS([r], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = bradley_terry_loss(r[w], r[l], RewardModelConfig())[0].mean()
        loss.backward()
        return loss

    opt.step(closure)
    fitted = (r - r[0]).detach()
    assert fitted.tolist() == pytest.approx(true.tolist(), abs=0.08)


def test_accuracy_counts_ties_half():
    assert pairwise_accuracy(torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])) == 0.625
