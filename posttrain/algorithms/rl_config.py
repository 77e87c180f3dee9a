"""Configs of the online RL objectives (`ppo.py`, `grpo.py`): plain dataclasses, importable without torch so that a
recipe's `ppo:` / `grpo:` sections are these very classes and are checked at load time (ValueError on a bad range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO (DeepSeekMath) and RLOO share it: RLOO only swaps the baseline (`scale_by_std` does not apply)."""

    beta: float = 0.04  # KL weight (DeepSeekMath; TRL now defaults to 0)
    clip_eps: float = 0.2
    aggregation: Literal["sequence_mean", "token_mean"] = "sequence_mean"  # (1/G) sum_i (1/|o_i|) sum_t, or over tokens
    scale_by_std: bool = True  # False: Dr. GRPO-style mean-centred advantages
    eps: float = 1e-6

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.aggregation not in ("sequence_mean", "token_mean"):
            raise ValueError(f"aggregation must be 'sequence_mean' or 'token_mean', got {self.aggregation!r}")


@dataclass(frozen=True)
class PPOConfig:
    """PPO-max (Zheng et al. 2023): each stabiliser is a switch, defaults as the paper recommends."""

    clip_eps: float = 0.2  # surrogate clip
    value_clip: float | None = 0.2  # clipped value loss around V_old; None: plain squared error
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # eta: token-level KL penalty in the reward
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # k1 in the reward (its sum over tokens is the sequence log-ratio)
    reward_norm: bool = True  # normalise scores with running mean/std ...
    reward_clip: float | None = 10.0  # ... and clip them to +-this (MOSS-RLHF's default)
    whiten_advantages: bool = False
    entropy_coef: float = 0.0
    ptx_coef: float = 0.0  # weight of the pretraining (SFT) loss mixed in: PPO-ptx
    value_coef: float = 0.5

    def __post_init__(self):
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator must be one of ['k1', 'k2', 'k3'], got {self.kl_estimator!r}")
        for name in ("kl_coef", "entropy_coef", "ptx_coef", "value_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError(f"value_clip must be > 0 (or null for no clip), got {self.value_clip}")
        if self.reward_clip is not None and self.reward_clip <= 0:
            raise ValueError(f"reward_clip must be > 0 (or null for no clip), got {self.reward_clip}")
