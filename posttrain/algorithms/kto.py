"""KTO: Kahneman-Tversky Optimisation on unpaired good/bad labels (Ethayarajh, Xu, Muennighoff,
Jurafsky, Kiela 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306).

Each example is one completion y with a binary label, no pair. The implicit reward r = log(pi/pi_ref)(y)
is compared with a reference point z0, an estimate of KL(pi || pi_ref) taken on mismatched
(prompt, completion) pairs of the batch, and passed through a sigmoid value function: gains and losses
saturate, as in prospect theory.
"""

from __future__ import annotations

import torch

from posttrain.algorithms.preference_config import KTOConfig  # noqa: F401  (re-exported)


def kto_reference_point(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(log pi - log pi_ref)) on mismatched completions, a detached scalar.

    Detached because the paper treats it as a baseline, not something to optimise; clamped because a
    KL is non-negative and the batch estimate can dip below zero.
    """
    return (policy_kl - ref_kl).mean().detach().clamp(min=0)


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, policy_kl: torch.Tensor,
             ref_kl: torch.Tensor, cfg: KTOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-example loss (B,) and metrics.

    policy, ref: (B,) summed log-probs of each example's completion; desirable: (B,) bool label;
    policy_kl, ref_kl: (B,) log-probs of mismatched completions (e.g. y of the next prompt in the batch).
    Desirable: lambda_D (1 - sigma(beta (r - z0))); undesirable: lambda_U (1 - sigma(beta (z0 - r))).
    z0 is a mean over this call's examples; a data-parallel caller should average it globally first.
    """
    desirable = desirable.to(torch.bool)
    z0 = kto_reference_point(policy_kl, ref_kl)  # ()
    r = policy - ref  # (B,)
    value = torch.where(desirable, torch.sigmoid(cfg.beta * (r - z0)), torch.sigmoid(cfg.beta * (z0 - r)))  # (B,)
    # Built in value's dtype: python floats would go through float32 first.
    weight = torch.where(desirable, value.new_tensor(cfg.desirable_weight), value.new_tensor(cfg.undesirable_weight))  # (B,)
    losses = weight * (1 - value)
    with torch.no_grad():
        rewards = cfg.beta * r
        metrics = {"kl": z0.item()}
        if desirable.any():
            metrics["rewards/chosen"] = rewards[desirable].mean().item()
        if (~desirable).any():
            metrics["rewards/rejected"] = rewards[~desirable].mean().item()
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses, metrics


def kto_pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, policy_kl: torch.Tensor, ref_kl: torch.Tensor,
                  cfg: KTOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO on preference pairs taken apart: y_w desirable, y_l undesirable (B pairs -> 2B examples).

    Returns the mean of each pair's two example losses (B,), so a pair-batched caller averages over the 2B
    examples exactly as KTO does; at initialisation every entry is (lambda_D + lambda_U) / 4.
    """
    B = policy_chosen.shape[0]
    desirable = torch.cat([torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)]).to(policy_chosen.device)
    losses, metrics = kto_loss(torch.cat([policy_chosen, policy_rejected]), torch.cat([ref_chosen, ref_rejected]),
                               desirable, policy_kl, ref_kl, cfg)  # (2B,)
    return 0.5 * (losses[:B] + losses[B:]), metrics
