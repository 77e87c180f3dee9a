"""GRPO and RLOO: critic-free policy gradients with a baseline from the other samples of the same prompt, and
RLVR reward shaping.

- GRPO: Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300. Outcome advantages A_i = (r_i - mean r) / std r within
  a group of G samples of one prompt, on every token; a clipped surrogate; beta * D_KL(pi || pi_ref) with the k3
  estimator as a loss term (not in the reward); 1/|o_i| token averaging per sample, then the mean over samples.
- RLOO: Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740. A_i = r_i - mean_{j != i} r_j = k/(k-1) (r_i - mean r).
- RLVR: Lambert et al. 2024, "Tulu 3", arXiv:2411.15124. Reward = alpha * 1[verifier passes], with a penalty when the
  response ends without EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.algorithms.kl import kl_k3, masked_mean


@dataclass(frozen=True)
class GRPOConfig:
    beta: float = 0.04  # KL weight (DeepSeekMath; TRL now defaults to 0)
    clip_eps: float = 0.2
    aggregation: str = "sequence_mean"  # "sequence_mean": (1/G) sum_i (1/|o_i|) sum_t (paper); "token_mean": over all tokens
    scale_by_std: bool = True  # False: Dr. GRPO-style mean-centred advantages
    eps: float = 1e-6

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.aggregation not in ("sequence_mean", "token_mean"):
            raise ValueError(f"aggregation must be 'sequence_mean' or 'token_mean', got {self.aggregation!r}")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantages (N,) for N = groups x G rewards laid out group by group.

    A group whose rewards are all equal carries no signal: its advantages are exactly 0 (the zero-std guard),
    not 0/eps noise.
    """
    r = rewards.view(-1, group_size)  # (groups, G)
    centred = r - r.mean(-1, keepdim=True)
    if not scale_by_std:
        return centred.flatten()
    std = r.std(-1, keepdim=True)  # unbiased, as DeepSeekMath's implementation
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred)).flatten()


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out baseline: r_i minus the mean of the other k-1 rewards of its group, (N,)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    r = rewards.view(-1, group_size)
    others = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return (r - others).flatten()


def rlvr_reward(correct: torch.Tensor, finished: torch.Tensor, scale: float = 10.0,
                no_eos_penalty: float = -10.0) -> torch.Tensor:
    """scale * 1[verified], and no_eos_penalty instead for a response cut off before EOS (Tulu 3: 10 and -10)."""
    reward = scale * correct.to(torch.float32)
    return torch.where(finished.bool(), reward, torch.full_like(reward, no_eos_penalty))


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, cfg: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO objective as a loss. logp, old_logp, ref_logp, mask: (N, T); advantages: (N,) per sample.

    With one update per rollout (old_logp == logp) the clip is idle and this is REINFORCE with a group baseline.
    """
    adv = advantages.unsqueeze(-1)  # (N, 1): the same advantage on every token of a sample
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)  # (N, T)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None and cfg.beta else torch.zeros_like(logp)
    per_token = per_token + cfg.beta * kl
    if cfg.aggregation == "sequence_mean":
        loss = masked_mean(per_token, mask, dim=-1).mean()
    else:
        loss = masked_mean(per_token, mask)
    with torch.no_grad():
        metrics = {"kl": masked_mean(kl, mask).item(), "ratio_mean": masked_mean(ratio, mask).item(),
                   "clip_frac": masked_mean(((ratio - 1).abs() > cfg.clip_eps).to(logp.dtype), mask).item()}
    return loss, metrics
