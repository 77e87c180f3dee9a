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

import torch

from posttrain.algorithms.kl import kl_k3, masked_mean
from posttrain.algorithms.rl_config import GRPOConfig  # noqa: F401  (the config lives torch-free, for recipes)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO outcome advantages (N,) for N = groups x G rewards laid out group by group.

    A group whose rewards are all equal carries no signal: its advantages are exactly 0 (the zero-std guard),
    not 0/eps noise. `valid` (N,) bool leaves samples out (a reward that could not be computed): the group's
    statistics use the others, and a left-out sample's advantage is 0.
    """
    ok = _valid(rewards, valid).view(-1, group_size)  # (groups, G)
    r = torch.where(ok, rewards.view(-1, group_size), torch.zeros_like(rewards.view(-1, group_size)))
    n = ok.sum(-1, keepdim=True)
    mean = r.sum(-1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(ok, r - mean, torch.zeros_like(r))
    if not scale_by_std:
        return centred.flatten()
    std = ((centred**2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # unbiased, as DeepSeekMath's code
    return torch.where((std > 0) & (n > 1), centred / (std + eps), torch.zeros_like(centred)).flatten()


def rloo_advantages(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Leave-one-out baseline: r_i minus the mean of the other k-1 rewards of its group, (N,).

    With `valid`, the baseline is the mean of the other valid samples; a group with fewer than 2 gives 0.
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    ok = _valid(rewards, valid).view(-1, group_size)
    r = torch.where(ok, rewards.view(-1, group_size), torch.zeros_like(rewards.view(-1, group_size)))
    n = ok.sum(-1, keepdim=True)
    others = (r.sum(-1, keepdim=True) - r) / (n - 1).clamp(min=1)
    return torch.where(ok & (n > 1), r - others, torch.zeros_like(r)).flatten()


def _valid(rewards: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    ok = torch.isfinite(rewards)
    return ok if valid is None else ok & valid.bool()


def rlvr_reward(correct: torch.Tensor, finished: torch.Tensor, scale: float = 10.0,
                no_eos_penalty: float = -10.0) -> torch.Tensor:
    """scale * 1[verified], and no_eos_penalty instead for a response cut off before EOS (Tulu 3: 10 and -10)."""
    return no_eos_reward(scale * correct.to(torch.float32), finished, no_eos_penalty)


def no_eos_reward(reward: torch.Tensor, finished: torch.Tensor, no_eos_penalty: float | None) -> torch.Tensor:
    """The reward of a response cut off before EOS is replaced by the penalty (None: left as scored)."""
    if no_eos_penalty is None:
        return reward
    return torch.where(finished.bool(), reward, torch.full_like(reward, no_eos_penalty))


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, cfg: GRPOConfig,
              is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO objective as a loss. logp, old_logp, ref_logp, mask: (N, T); advantages: (N,) per sample or (N, T).

    With one update per rollout (old_logp == logp) the clip is idle and this is REINFORCE with a group baseline.
    is_weights (N, T): truncated importance weights on the surrogate (importance.py); the KL term is unweighted.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # the sample's advantage on every token
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)  # (N, T)
    if is_weights is not None:
        per_token = per_token * is_weights
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
