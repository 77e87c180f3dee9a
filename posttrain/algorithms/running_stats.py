"""Running mean and variance over every value seen so far (Welford 1962; Chan et al. 1979 for batches).

PPO-max normalises rewards against these historical statistics, not the current batch's: a batch of all-good
samples should still look good. Merging a batch (n_b, mean_b, M2_b) into (n, mean, M2) is exact in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RunningMoments:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    def update(self, values: torch.Tensor) -> None:
        x = values.detach().double().flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    @property
    def var(self) -> float:
        """Population variance (numpy's default, ddof=0)."""
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def normalize(self, values: torch.Tensor, clip: float | None = None, eps: float = 1e-8) -> torch.Tensor:
        """(r - mean) / std against the running statistics, then clipped to +-clip."""
        out = (values - self.mean) / (self.std + eps)
        return out.clamp(-clip, clip) if clip is not None else out

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
