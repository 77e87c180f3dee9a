"""Off-policy correction between the sampler and the learner.

The sampler (vLLM, or HF generate in another process, maybe another dtype) and the learner compute log-probs of the
same tokens slightly differently, so samples are never exactly on-policy for the learner. The per-token importance
ratio w_t = pi_learner(y_t) / pi_sampler(y_t) measures the gap; truncated importance sampling (Yao et al. 2025,
"Your efficient RL framework secretly brings you off-policy RL training"; Espeholt et al. 2018 for the truncation)
multiplies each token's policy-gradient loss by min(w_t, C), a constant (no gradient through the weight).
"""

from __future__ import annotations

import torch

from posttrain.algorithms.kl import masked_mean


def importance_weights(learner_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       cap: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token weights (N, T): min(w_t, cap), or all 1 when cap is None (the ratio is still measured)."""
    log_w = (learner_logp - sampler_logp).detach()
    w = torch.exp(log_w)
    real = mask.bool()
    metrics = {"is_ratio_mean": masked_mean(w, mask).item(),
               "is_ratio_max": w[real].max().item() if real.any() else 1.0,
               "is_ratio_min": w[real].min().item() if real.any() else 1.0,
               "is_logratio_abs_mean": masked_mean(log_w.abs(), mask).item()}
    if cap is None:
        return torch.ones_like(w), metrics
    metrics["is_truncated_frac"] = masked_mean((w > cap).to(w.dtype), mask).item()
    return w.clamp(max=cap), metrics
