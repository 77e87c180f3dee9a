"""Per-token log-probabilities of a causal LM: shared by every loss that needs log pi(y|x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for logits (..., V) and targets (...), in float32 so bf16 keeps the tail.

    Cross-entropy's fused kernel computes x[y] - logsumexp(x) without materialising the log-softmax, and its
    backward is cheaper than gather + logsumexp (it matters: the vocabulary projection is a large share of a step).
    """
    V = logits.shape[-1]
    nll = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), reduction="none")
    return -nll.reshape(targets.shape)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1.

    logits: (B, T, V) from the model on input_ids (B, T). Returns (B, T-1): entry t-1 is the
    log-probability of token t (position t predicts token t+1).
    """
    return target_logprobs(logits[:, :-1], input_ids[:, 1:])
