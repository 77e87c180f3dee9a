"""Per-token log-probabilities of a causal LM: shared by every loss that needs log pi(y|x)."""

from __future__ import annotations

import torch


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for logits (..., V) and targets (...), in float32 so bf16 keeps the tail.

    Computed as x[y] - logsumexp(x), without materialising the full log_softmax.
    """
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1.

    logits: (B, T, V) from the model on input_ids (B, T). Returns (B, T-1): entry t-1 is the
    log-probability of token t (position t predicts token t+1).
    """
    return target_logprobs(logits[:, :-1], input_ids[:, 1:])
