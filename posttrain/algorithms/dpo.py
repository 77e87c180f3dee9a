"""Pairwise preference losses of the DPO family, on sequence log-probabilities.

Every loss reads a PreferenceBatch of per-pair tensors (B,): log pi(y|x) summed over the response
tokens for the chosen y_w and the rejected y_l, under the policy and (except SimPO) the frozen
reference. Each returns the per-pair loss (B,), so the caller picks the reduction (mean over the
global batch, weighting, ...). `preference_loss` dispatches by name and adds logging metrics.

Papers (notation follows them: beta the KL weight, h the log-ratio margin):
- DPO: Rafailov, Sharma, Mitchell, Ermon, Manning, Finn 2023, arXiv:2305.18290.
- cDPO: Mitchell 2023, "A note on DPO with noisy preferences and relationship to IPO" (label smoothing).
- Robust DPO: Chowdhury, Kini, Natarajan 2024, "Provably Robust DPO", arXiv:2403.00409.
- IPO: Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos 2023, arXiv:2310.12036.
- RPO: Pang, Yuan, Cho, He, Sukhbaatar, Weston 2024, "Iterative Reasoning Preference Optimization",
  arXiv:2404.19733; Liu et al. 2024, "Your SFT loss is implicitly an adversarial regularizer", arXiv:2405.16436.
- H-DPO: Omura, Fujita, Kataoka 2024, "Entropy Controllable Direct Preference Optimization", arXiv:2411.07595.
- EXO: Ji, Ke, Wang, Lei, Huang, Zhu, Zhang 2024, "Towards Efficient Exact Optimization of Language
  Model Alignment", arXiv:2402.00856.
- SimPO: Meng, Xia, Chen 2024, "Simple Preference Optimization with a Reference-Free Reward", arXiv:2405.14734.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.algorithms.preference_config import (  # noqa: F401  (re-exported: the configs of these losses)
    PAIRWISE_CONFIGS,
    CDPOConfig,
    DPOConfig,
    EXOConfig,
    HDPOConfig,
    IPOConfig,
    RobustDPOConfig,
    RPOConfig,
    SimPOConfig,
)
import torch.nn.functional as F


@dataclass(frozen=True)
class PreferenceBatch:
    """Per-pair inputs, all (B,). Log-probs are summed over response tokens.

    ref_* are unused by SimPO; chosen_nll is RPO's extra term (e.g. the length-normalised NLL of y_w);
    chosen_len / rejected_len are the response token counts SimPO averages over.
    """

    policy_chosen: torch.Tensor  # (B,) log pi(y_w|x)
    policy_rejected: torch.Tensor  # (B,) log pi(y_l|x)
    ref_chosen: torch.Tensor | None = None  # (B,) log pi_ref(y_w|x)
    ref_rejected: torch.Tensor | None = None  # (B,) log pi_ref(y_l|x)
    chosen_nll: torch.Tensor | None = None  # (B,)
    chosen_len: torch.Tensor | None = None  # (B,)
    rejected_len: torch.Tensor | None = None  # (B,)

    def __post_init__(self):
        shape = self.policy_chosen.shape
        if len(shape) != 1:
            raise ValueError(f"policy_chosen must be (B,), got {tuple(shape)}")
        for name in ("policy_rejected", "ref_chosen", "ref_rejected", "chosen_nll", "chosen_len", "rejected_len"):
            t = getattr(self, name)
            # Broadcasting a (B, 1) against a (B,) would silently build a (B, B) loss.
            if t is not None and t.shape != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")

    def require(self, *names: str) -> tuple[torch.Tensor, ...]:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"this loss needs {missing} in the PreferenceBatch")
        return tuple(getattr(self, n) for n in names)


def logratio_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = log(pi/pi_ref)(y_w) - log(pi/pi_ref)(y_l), (B,): the implicit reward gap divided by beta."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def _margin(batch: PreferenceBatch) -> torch.Tensor:
    ref_chosen, ref_rejected = batch.require("ref_chosen", "ref_rejected")
    return logratio_margin(batch.policy_chosen, batch.policy_rejected, ref_chosen, ref_rejected)  # (B,)


def dpo_loss(batch: PreferenceBatch, cfg: DPOConfig) -> torch.Tensor:
    """-log sigma(beta h), (B,): Bradley-Terry likelihood of the preference under the implicit reward."""
    return -F.logsigmoid(cfg.beta * _margin(batch))


def cdpo_loss(batch: PreferenceBatch, cfg: CDPOConfig) -> torch.Tensor:
    """-(1-eps) log sigma(beta h) - eps log sigma(-beta h), (B,).

    Cross-entropy against a soft label: the optimum is the finite h* = log((1-eps)/eps)/beta, so the
    margin stops growing once the model is as confident as the labels deserve.
    """
    z = cfg.beta * _margin(batch)  # (B,)
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def robust_dpo_loss(batch: PreferenceBatch, cfg: RobustDPOConfig) -> torch.Tensor:
    """[-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps), (B,).

    Under symmetric label flips at rate eps, its expectation over the noisy label is the clean DPO
    loss (an unbiased estimator), unlike cDPO which changes the optimum.
    """
    z = cfg.beta * _margin(batch)  # (B,)
    eps = cfg.flip_rate
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def ipo_loss(batch: PreferenceBatch, cfg: IPOConfig) -> torch.Tensor:
    """(h - 1/(2 tau))^2, (B,): regress the margin onto a finite target instead of pushing it to infinity.

    The paper's h is on whole-sequence log-probs. Implementations that average log-probs per token
    (TRL) use a different scale of tau; pass averaged log-probs in the batch to reproduce them.
    """
    return (_margin(batch) - 1 / (2 * cfg.tau)) ** 2


def rpo_loss(batch: PreferenceBatch, cfg: RPOConfig) -> torch.Tensor:
    """DPO + eta * NLL(y_w), (B,): the NLL keeps the chosen likelihood from falling while the margin grows.

    The caller supplies the NLL per pair (Pang et al. normalise it by the response length).
    """
    (nll,) = batch.require("chosen_nll")
    return dpo_loss(batch, DPOConfig(cfg.beta)) + cfg.eta * nll


def hdpo_loss(batch: PreferenceBatch, cfg: HDPOConfig) -> torch.Tensor:
    """-log sigma(beta [alpha log pi(y_w) - log pi_ref(y_w) - alpha log pi(y_l) + log pi_ref(y_l)]), (B,).

    Scaling the entropy term of the KL by alpha gives pi* ~ pi_ref^(1/alpha) exp(r/(alpha beta)).
    Grouped as DPO's margin so that alpha = 1 reproduces DPO bit for bit.
    """
    ref_chosen, ref_rejected = batch.require("ref_chosen", "ref_rejected")
    h_alpha = (cfg.alpha * batch.policy_chosen - ref_chosen) - (cfg.alpha * batch.policy_rejected - ref_rejected)  # (B,)
    return -F.logsigmoid(cfg.beta * h_alpha)


def exo_pair_loss(batch: PreferenceBatch, cfg: EXOConfig) -> torch.Tensor:
    """KL(f_theta || p_r) over the pair, (B,), with f_theta = (q, 1-q), q = sigma(beta h), p_r = (1-eps, eps).

    The reverse KL is mode-seeking: it fits the preferred completion rather than averaging over both
    as DPO's forward KL does. Written with logsigmoid so that q near 0 or 1 stays finite.
    """
    z = cfg.beta * _margin(batch)  # (B,)
    eps = cfg.epsilon
    q_w, q_l = torch.sigmoid(z), torch.sigmoid(-z)
    return q_w * (F.logsigmoid(z) - math.log1p(-eps)) + q_l * (F.logsigmoid(-z) - math.log(eps))


def simpo_loss(batch: PreferenceBatch, cfg: SimPOConfig) -> torch.Tensor:
    """-log sigma(beta avg log pi(y_w) - beta avg log pi(y_l) - gamma), (B,). No reference model.

    The reward is the length-averaged log-prob, the quantity generation ranks by, so longer responses
    are not favoured for their larger summed log-prob; gamma asks for a margin beyond a tie.
    """
    chosen_len, rejected_len = batch.require("chosen_len", "rejected_len")
    avg_chosen = batch.policy_chosen / chosen_len  # (B,)
    avg_rejected = batch.policy_rejected / rejected_len  # (B,)
    return -F.logsigmoid(cfg.beta * avg_chosen - cfg.beta * avg_rejected - cfg.gamma)


PairwiseLoss = Callable[[PreferenceBatch, object], torch.Tensor]

PAIRWISE_LOSSES: dict[str, PairwiseLoss] = {
    "dpo": dpo_loss,
    "cdpo": cdpo_loss,
    "rdpo": robust_dpo_loss,
    "ipo": ipo_loss,
    "rpo": rpo_loss,
    "hdpo": hdpo_loss,
    "exo": exo_pair_loss,
    "simpo": simpo_loss,
}


def implicit_rewards(name: str, batch: PreferenceBatch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-response rewards each method implicitly fits, (B,) each, for logging.

    beta log(pi/pi_ref)(y) for the KL-regularised methods (tau plays beta's role in IPO, alpha scales
    the policy term in H-DPO), and beta times the average log-prob for SimPO.
    """
    if name == "simpo":
        chosen_len, rejected_len = batch.require("chosen_len", "rejected_len")
        return cfg.beta * batch.policy_chosen / chosen_len, cfg.beta * batch.policy_rejected / rejected_len
    ref_chosen, ref_rejected = batch.require("ref_chosen", "ref_rejected")
    scale = cfg.tau if name == "ipo" else cfg.beta
    alpha = cfg.alpha if name == "hdpo" else 1.0
    return (scale * (alpha * batch.policy_chosen - ref_chosen),
            scale * (alpha * batch.policy_rejected - ref_rejected))


def preference_loss(name: str, cfg, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair loss (B,) of method `name` and its metrics (python floats, means over the batch)."""
    if name not in PAIRWISE_LOSSES:
        raise ValueError(f"unknown pairwise loss {name!r}; known: {sorted(PAIRWISE_LOSSES)}")
    if not isinstance(cfg, PAIRWISE_CONFIGS[name]):
        raise TypeError(f"{name} needs a {PAIRWISE_CONFIGS[name].__name__}, got {type(cfg).__name__}")
    losses = PAIRWISE_LOSSES[name](batch, cfg)  # (B,)
    with torch.no_grad():
        chosen, rejected = implicit_rewards(name, batch, cfg)  # (B,) each
        margin = chosen - rejected
        metrics = {
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/margin": margin.mean().item(),
            "rewards/accuracy": (margin > 0).float().mean().item(),
            "logps/chosen": batch.policy_chosen.mean().item(),
            "logps/rejected": batch.policy_rejected.mean().item(),
        }
    return losses, metrics


def xpo_bonus(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, alpha: float) -> torch.Tensor:
    """XPO's exploration term alpha * log pi(y~|x), y~ ~ pi_ref (Xie, Foster, Krishnamurthy, Rosset, Awadallah,
    Rakhlin 2024, "Exploratory Preference Optimization", arXiv:2405.21046), per pair (B,).

    Added to a DPO loss it lowers the policy's probability of what the reference already samples, an implicit
    optimism bonus. In online rounds both responses of a pair are reference samples (the reference is the
    round's starting policy), so y~ is either; averaging the two halves the variance. alpha = 0: online DPO.
    """
    return alpha * 0.5 * (policy_chosen + policy_rejected)
