"""Configs of the pairwise DPO-family losses (`dpo.py`): plain dataclasses, importable without torch so that
recipes validate a loss's knobs at load time. Each checks its ranges in __post_init__ (ValueError).
"""

from __future__ import annotations

from dataclasses import dataclass


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_eps(name: str, eps: float) -> None:
    # eps = 1/2 makes the label uninformative (cDPO: zero gradient; robust DPO divides by zero).
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"{name} must be in [0, 0.5), got {eps}")


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1

    def __post_init__(self):
        _check_beta(self.beta)


@dataclass(frozen=True)
class CDPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.1  # eps: assumed probability that a label is flipped

    def __post_init__(self):
        _check_beta(self.beta)
        _check_eps("label_smoothing", self.label_smoothing)


@dataclass(frozen=True)
class RobustDPOConfig:
    beta: float = 0.1
    flip_rate: float = 0.1  # eps: known rate of symmetric label noise (0.1 in the paper)

    def __post_init__(self):
        _check_beta(self.beta)
        _check_eps("flip_rate", self.flip_rate)


@dataclass(frozen=True)
class IPOConfig:
    tau: float = 0.1  # KL weight; the target margin is 1/(2 tau)

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


@dataclass(frozen=True)
class RPOConfig:
    beta: float = 0.1
    eta: float = 1.0  # weight of the chosen NLL; Pang et al. use 1 on a length-normalised NLL

    def __post_init__(self):
        _check_beta(self.beta)
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")


@dataclass(frozen=True)
class HDPOConfig:
    alpha: float  # entropy scale: < 1 sharpens pi, 1 is DPO; no default, the right value is task-dependent
    beta: float = 0.1

    def __post_init__(self):
        _check_beta(self.beta)
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")


@dataclass(frozen=True)
class EXOConfig:
    beta: float = 0.1
    epsilon: float = 1e-3  # p_r = (1 - eps, eps): the target must have full support for a finite KL

    def __post_init__(self):
        _check_beta(self.beta)
        if not 0.0 < self.epsilon < 0.5:
            raise ValueError(f"epsilon must be in (0, 0.5), got {self.epsilon}")


@dataclass(frozen=True)
class SimPOConfig:
    beta: float = 2.0
    gamma: float = 1.0  # target reward margin; the paper tunes gamma/beta around 0.5

    def __post_init__(self):
        _check_beta(self.beta)
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")


@dataclass(frozen=True)
class KTOConfig:
    beta: float = 0.1
    desirable_weight: float = 1.0  # lambda_D; keep lambda_D n_D / (lambda_U n_U) in [1, 4/3]
    undesirable_weight: float = 1.0  # lambda_U

    def __post_init__(self):
        _check_beta(self.beta)
        if not (self.desirable_weight > 0 and self.undesirable_weight > 0):
            raise ValueError(f"weights must be > 0, got {self.desirable_weight}, {self.undesirable_weight}")


PAIRWISE_CONFIGS: dict[str, type] = {
    "dpo": DPOConfig,
    "cdpo": CDPOConfig,
    "rdpo": RobustDPOConfig,
    "ipo": IPOConfig,
    "rpo": RPOConfig,
    "hdpo": HDPOConfig,
    "exo": EXOConfig,
    "simpo": SimPOConfig,
}

# Every loss a dpo stage can train with: the pairwise ones, and KTO on the pairs unpaired (chosen desirable,
# rejected undesirable).
LOSS_CONFIGS: dict[str, type] = {**PAIRWISE_CONFIGS, "kto": KTOConfig}
