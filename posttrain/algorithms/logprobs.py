"""Per-token log-probabilities of a causal LM: shared by every loss that needs log pi(y|x)."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1.

    logits: (B, T, V) from the model on input_ids (B, T). Returns (B, T-1): entry t-1 is the
    log-probability of token t. Computed in float32 so bf16 models do not lose the tail.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    targets = input_ids[:, 1:].unsqueeze(-1)  # (B, T-1, 1)
    # log_softmax(x)[y] = x[y] - logsumexp(x), without materialising the full log_softmax.
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
