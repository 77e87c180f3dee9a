"""Per-token KL estimators between the policy and a reference (Schulman 2020, "Approximating KL divergence").

With log-ratio d = log pi_theta(x) - log pi_ref(x) on tokens x sampled from pi_theta:
- k1 = d: unbiased for KL(pi_theta || pi_ref), high variance, can be negative per token;
- k2 = d^2 / 2: biased, low variance, >= 0;
- k3 = exp(-d) - 1 + d (= pi_ref/pi_theta - log(pi_ref/pi_theta) - 1, DeepSeekMath's D_KL): unbiased, >= 0.
"""

from __future__ import annotations

import torch


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    d = ref_logp - logp  # log(pi_ref / pi_theta)
    return torch.expm1(d) - d  # exp(d) - 1 - d without cancellation near 0


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)
