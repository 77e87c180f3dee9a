"""The per-micro-batch loss of an online RL update (PPO, GRPO or RLOO), with its optional extras: truncated
importance sampling between learner and sampler, the PPO entropy bonus, and a z-loss on the output logits.

Loss aggregation across micro-batches and ranks: each call returns a *sum* (over sequences for GRPO's
sequence-mean, over tokens otherwise) and says which count it must be divided by; the learner divides by that count
over the whole minibatch, so the update is the same for any split into micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.algorithms.grpo import grpo_loss
from posttrain.algorithms.importance import importance_weights
from posttrain.algorithms.kl import kl_k3, masked_mean
from posttrain.algorithms.ppo import policy_loss
from posttrain.algorithms.rl_config import GRPOConfig, PPOConfig


@dataclass(frozen=True)
class RLObjective:
    algorithm: str  # "grpo" | "rloo" (GRPO's loss with RLOO advantages) | "ppo"
    grpo: GRPOConfig = GRPOConfig()
    ppo: PPOConfig = PPOConfig()
    tis_cap: float | None = None  # truncated importance sampling: min(pi_learner / pi_sampler, cap) per token
    z_loss_coef: float = 0.0  # + coef * mean (log Z)^2 (PaLM): keeps the softmax normaliser near 1

    @property
    def normaliser(self) -> str:
        """'seqs' or 'tokens': what a micro-batch's loss sum is divided by (counted over the minibatch)."""
        return "seqs" if self.algorithm != "ppo" and self.grpo.aggregation == "sequence_mean" else "tokens"


def rl_loss(obj: RLObjective, logp: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
            sampler_logp: torch.Tensor, advantages: torch.Tensor, ref_logp: torch.Tensor | None,
            entropy: torch.Tensor, log_z: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss sum (see the module docstring) and token-mean metrics. All tensors (N, T) over completion tokens."""
    weights, metrics = importance_weights(old_logp, sampler_logp, mask, obj.tis_cap)
    weights = None if obj.tis_cap is None else weights
    if obj.algorithm == "ppo":
        loss, m = policy_loss(logp, old_logp, advantages, mask, obj.ppo.clip_eps, weights)
        if obj.ppo.entropy_coef:
            loss = loss - obj.ppo.entropy_coef * masked_mean(entropy, mask)
        if ref_logp is not None:  # PPO's KL is in the reward; this is only measured
            m["kl"] = masked_mean(kl_k3(logp.detach(), ref_logp), mask).item()
    else:
        loss, m = grpo_loss(logp, old_logp, ref_logp, advantages, mask, obj.grpo, weights)
    if obj.z_loss_coef:
        loss = loss + obj.z_loss_coef * masked_mean(log_z**2, mask)
    count = mask.shape[0] if obj.normaliser == "seqs" else mask.sum()
    with torch.no_grad():
        metrics.update(m)
        metrics["entropy"] = masked_mean(entropy, mask).item()
        metrics["log_z"] = masked_mean(log_z, mask).item()
        metrics["log_z_max"] = log_z[mask.bool()].max().item() if mask.any() else 0.0
    return loss * count, metrics
