"""PPO for language models with the PPO-max stabilisers (Zheng et al. 2023, "Secrets of RLHF in Large Language
Models Part I: PPO", arXiv:2307.04964; PPO: Schulman et al. 2017, arXiv:1707.06347; GAE: Schulman et al. 2016,
arXiv:1506.02438).

Tensors are (B, T) over response tokens with a mask (1 on real tokens). Each stabiliser is a switch in PPOConfig
with the paper's recommendation as its default: reward normalisation + clipping against running statistics, a
token-level KL penalty in the reward, the clipped value loss, the clipped surrogate, GAE with gamma 1 and lambda
0.95; advantage whitening, the entropy bonus and the pretraining (ptx) term are off, as the paper found them
secondary or harmful when stacked. The ptx term (InstructGPT, arXiv:2203.02155: + gamma E_pretrain[log pi]) is
ptx_coef x the mean NLL of a supervised batch, added in the learner's rl_step.
"""

from __future__ import annotations

import torch

from posttrain.algorithms.kl import KL_ESTIMATORS, masked_mean
from posttrain.algorithms.rl_config import PPOConfig  # noqa: F401  (the config lives torch-free, for recipes)


def token_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, estimator: str = "k1") -> torch.Tensor:
    """r_t = -eta KL_t on every response token, plus the sequence score on the last one. (B,), (B, T) -> (B, T)."""
    rewards = -kl_coef * KL_ESTIMATORS[estimator](logp, ref_logp) * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()  # the last real token of each row
    return rewards + last.to(rewards.dtype) * score.unsqueeze(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (B, T), computed right to left; V after the last token is 0.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns R_t = A_t + V_t.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        next_value = torch.where(m.bool(), values[:, t], next_value)  # padding passes the future through
        next_adv = torch.where(m.bool(), a, next_adv)
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float, is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate -min(rho A, clip(rho, 1 +- eps) A), token mean. At rho = 1 its gradient is -A grad log pi.

    is_weights (B, T): truncated importance weights between learner and sampler (importance.py), or None.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    loss = masked_mean(per_token if is_weights is None else per_token * is_weights, mask)
    with torch.no_grad():
        metrics = {"clip_frac": masked_mean((clipped < unclipped).to(logp.dtype), mask).item(),
                   "ratio_mean": masked_mean(ratio, mask).item(),
                   "ratio_max": ratio[mask.bool()].max().item() if mask.any() else 1.0}
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2): the clip only bites when |V - V_old| > c."""
    plain = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(plain, mask), {"value_clip_frac": 0.0}
    clipped_v = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_v - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask)
    return loss, {"value_clip_frac": masked_mean((clipped > plain).to(values.dtype), mask).item()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution, (..., V) -> (...), in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
