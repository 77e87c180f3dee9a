"""Reward model training: the Bradley-Terry pairwise likelihood on a scalar head.

P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)) (Bradley & Terry 1952), as fitted by InstructGPT's reward
model (Ouyang et al. 2022, arXiv:2203.02155): L = -log sigma(r_w - r_l). The likelihood only sees reward
differences, so r is defined up to a constant per prompt; the optional centring term of Eisenstein et al.
2023 ("Helping or Herding?", arXiv:2312.09244), eta * (r_w + r_l)^2, pins that constant near zero so scores
from different prompts are comparable (as TRL's center_rewards_coefficient does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RewardModelConfig:
    center_coefficient: float = 0.0  # eta; 0.01 in Eisenstein et al.

    def __post_init__(self):
        if not self.center_coefficient >= 0:
            raise ValueError(f"center_coefficient must be >= 0, got {self.center_coefficient}")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       cfg: RewardModelConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair loss (B,) and batch metrics, from the scalar rewards (B,) of the chosen and rejected responses."""
    losses = -F.logsigmoid(r_chosen - r_rejected)  # (B,)
    if cfg.center_coefficient:
        losses = losses + cfg.center_coefficient * (r_chosen + r_rejected) ** 2
    with torch.no_grad():
        metrics = {"accuracy": pairwise_accuracy(r_chosen, r_rejected),
                   "margin": (r_chosen - r_rejected).mean().item(),
                   "reward_mean": 0.5 * (r_chosen + r_rejected).mean().item()}
    return losses, metrics


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs ranked right; a tie counts half (a constant model scores 0.5, not 0 or 1)."""
    right = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()
    return right.mean().item()
