"""Supervised fine-tuning: negative log-likelihood on completion tokens only."""

from __future__ import annotations

import torch

from posttrain.algorithms.logprobs import token_logprobs


def completion_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL over target tokens and their count.

    logits: (B, T, V); input_ids: (B, T); loss_mask: (B, T), 1 where token t is a completion token
    (prompt and padding are 0). Returns (sum of -log p over masked tokens, number of masked tokens).
    The caller divides by the token count of the whole global batch, so every token weighs the same
    however the batch is split across actors and micro-batches.
    """
    mask = loss_mask[:, 1:].to(torch.float32)  # (B, T-1): token t+1 is predicted at position t
    nll = -token_logprobs(logits, input_ids) * mask
    return nll.sum(), mask.sum()
