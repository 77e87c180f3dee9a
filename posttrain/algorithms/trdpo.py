"""TR-DPO's moving reference (Gorbatovski, Shaposhnikov, Malakhov, Surnachev, Aksenov, Maksimov,
Balagansky, Gavrilov 2024, "Learn Your Reference Model for Real Good Alignment", arXiv:2404.09656).

The loss is unchanged (any of dpo.py's); only pi_ref moves towards the policy during training, which
widens the trust region the KL term draws around it:
- soft: theta_ref <- alpha theta + (1 - alpha) theta_ref;
- hard: theta_ref <- theta.
Either is applied once every tau optimiser steps (TRL applies its soft mix the same way; tau = 1
gives a per-step soft update). alpha = 0 or tau = inf is plain DPO.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

Params = Mapping[str, torch.Tensor] | Iterable[torch.Tensor]


@dataclass(frozen=True)
class TRDPOConfig:
    alpha: float = 0.6  # soft-update weight of the policy
    tau: float = 512  # optimiser steps between updates; math.inf never updates
    mode: str = "soft"  # "soft" | "hard"

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not (self.tau >= 1 and (math.isinf(self.tau) or float(self.tau).is_integer())):
            raise ValueError(f"tau must be an integer >= 1 or inf, got {self.tau}")
        if self.mode not in ("soft", "hard"):
            raise ValueError(f"mode must be 'soft' or 'hard', got {self.mode!r}")


def _pairs(ref_params: Params, policy_params: Params) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(ref_params, Mapping):
        if not isinstance(policy_params, Mapping) or ref_params.keys() != policy_params.keys():
            raise ValueError("ref and policy state dicts must have the same keys")
        return [(ref_params[k], policy_params[k]) for k in ref_params]
    ref, pol = list(ref_params), list(policy_params)
    if len(ref) != len(pol):
        raise ValueError(f"{len(ref)} reference tensors but {len(pol)} policy tensors")
    return list(zip(ref, pol))


@torch.no_grad()
def soft_update(ref_params: Params, policy_params: Params, alpha: float) -> None:
    """theta_ref <- alpha theta + (1 - alpha) theta_ref, in place.

    Takes two state dicts (matched by key) or two parameter iterables (matched by position).
    Non-float entries (integer buffers such as step counters) cannot be mixed and are copied.
    """
    for ref, pol in _pairs(ref_params, policy_params):
        if ref.shape != pol.shape:
            raise ValueError(f"shape mismatch {tuple(ref.shape)} vs {tuple(pol.shape)}")
        if ref.is_floating_point():
            ref.lerp_(pol.to(ref.dtype), alpha)  # ref + alpha (pol - ref): alpha = 0 leaves ref bit-identical
        else:
            ref.copy_(pol)


@torch.no_grad()
def hard_update(ref_params: Params, policy_params: Params) -> None:
    """theta_ref <- theta, in place: right after it the DPO loss is log 2 on every pair."""
    for ref, pol in _pairs(ref_params, policy_params):
        if ref.shape != pol.shape:
            raise ValueError(f"shape mismatch {tuple(ref.shape)} vs {tuple(pol.shape)}")
        ref.copy_(pol)


def should_update(step: int, cfg: TRDPOConfig) -> bool:
    """Whether to update the reference after optimiser step `step` (1-based count of completed steps)."""
    return step > 0 and step % cfg.tau == 0


def update_reference(ref_params: Params, policy_params: Params, cfg: TRDPOConfig) -> None:
    """Apply cfg's update (soft or hard) once; the caller decides when, with should_update."""
    if cfg.mode == "soft":
        soft_update(ref_params, policy_params, cfg.alpha)
    else:
        hard_update(ref_params, policy_params)
