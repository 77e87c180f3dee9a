"""Shared-prefix forward: a group's completions share one copy of their prompt (Prefix Grouper, Liu et al. 2025).

GRPO/RLOO sample G completions per prompt, and a plain batch runs the prompt through the model G times, in the
policy's forward and backward and in the reference's forward. Here every token is laid out once, end to end in a
single row: each distinct prompt, then each completion right after its prompt's copy. Everything but attention is
per token, so it runs on that row unchanged; attention runs per sequence on gathered keys, which is where a
completion reads the one copy of its prompt (`shared_prefix_attention`). The log-probs equal a separate forward of
each sequence (tests/test_shared_prefix.py checks values and gradients), and the prompt's gradient is the sum
over the group, as it is when each sequence carries its own copy.

Attention is a function registered with transformers' AttentionInterface and switched on for the duration of one
forward (`shared_prefix_forward`), so the model's own modules, LoRA adapters and DeepSpeed hooks all run as usual.
It is exact for the architectures the lean decoder supports (decode.unsupported_reason): rotary positions from
position_ids and full causal attention.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION = "posttrain_shared_prefix"


@dataclass
class PrefixSegments:
    """One segment per sequence: the row positions of its keys (its prompt's copy, then its completion) and of the
    queries it owns (the completion; the first sequence of a prompt also owns the prompt). Crosses Ray."""

    query_index: torch.Tensor  # (S, Lq) long: row positions, 0 in padding slots
    key_index: torch.Tensor  # (S, Lk) long
    mask: torch.Tensor  # (S, 1, Lq, Lk) bool: key is in the segment and not after the query
    inverse: torch.Tensor  # (N,) long: row position -> its slot in the (S * Lq) flattened queries

    def to(self, device) -> PrefixSegments:
        return PrefixSegments(*(t.to(device) for t in (self.query_index, self.key_index, self.mask, self.inverse)))


def build_segments(queries: list[list[int]], keys: list[list[int]], positions: torch.Tensor) -> PrefixSegments:
    """queries[s], keys[s]: row positions (ascending) of segment s's queries and keys; positions (N,): each row
    position's position within its own sequence. Every row position is the query of exactly one segment."""
    n_q, n_k = np.array([len(q) for q in queries]), np.array([len(k) for k in keys])
    q_real = np.arange(n_q.max()) < n_q[:, None]  # (S, Lq): slots holding a query, row-major = segment order
    k_real = np.arange(n_k.max()) < n_k[:, None]
    q_index = np.zeros(q_real.shape, dtype=np.int64)
    k_index = np.zeros(k_real.shape, dtype=np.int64)
    q_index[q_real] = np.concatenate(queries)
    k_index[k_real] = np.concatenate(keys)
    inverse = np.full(positions.numel(), -1, dtype=np.int64)
    inverse[q_index[q_real]] = np.flatnonzero(q_real)  # slot s * Lq + j
    assert (inverse >= 0).all(), "every row position must be the query of one segment"
    q_index, k_index, q_real, k_real = map(torch.from_numpy, (q_index, k_index, q_real, k_real))
    mask = k_real[:, None, :] & (positions[k_index][:, None, :] <= positions[q_index][:, :, None])
    mask[:, :, 0] |= ~q_real  # a padding query sees one key: its softmax stays finite (its output is never read)
    return PrefixSegments(q_index, k_index, mask[:, None], torch.from_numpy(inverse))


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            prefix_segments: PrefixSegments | None = None, **_):
    """AttentionInterface function. query (1, H, N, D), key/value (1, Hkv, N, D) over the shared row, after the
    rotary embedding; returns (1, N, H, D) as transformers' own attention functions do."""
    if prefix_segments is None:
        raise RuntimeError(f"attention {ATTENTION!r} needs prefix_segments (use shared_prefix_forward)")
    seg = prefix_segments
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, heads, D)
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
    out = F.scaled_dot_product_attention(q[seg.query_index].transpose(1, 2), k[seg.key_index].transpose(1, 2),
                                         v[seg.key_index].transpose(1, 2), attn_mask=seg.mask, dropout_p=dropout,
                                         scale=scaling)  # (S, H, Lq, D)
    S, H, Lq, D = out.shape
    return out.transpose(1, 2).reshape(S * Lq, H, D)[seg.inverse].unsqueeze(0), None


AttentionInterface.register(ATTENTION, shared_prefix_attention)


@contextmanager
def shared_prefix_forward(model):
    """Within: `model` (a transformers model, or one wrapped by peft or DeepSpeed) attends with
    shared_prefix_attention. transformers builds no mask for an attention it does not know, and every attention
    module reads the shared config at call time; the backward does not read it."""
    config = getattr(model, "module", model).config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
