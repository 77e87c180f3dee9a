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
On CPU in float32 a C++ kernel (posttrain/kernels/shared_prefix_attention.cpp) computes it, forward and backward:
each segment reads its rows in place, where torch's attention needs gathered, padded and masked copies (and their
scattered gradients). In the GRPO benchmark's learner that is 1.0 ms against 2.2 ms for a layer's forward and
2.6 ms against 5.3 ms with its backward (1604 tokens, 4 heads of 32). Elsewhere, or without a compiler, torch's
attention (`torch_attention`) runs; tests/test_shared_prefix.py checks both against the definition.
It is exact for the architectures the lean decoder supports (decode.unsupported_reason): rotary positions from
position_ids and full causal attention.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION = "posttrain_shared_prefix"


@dataclass
class PrefixSegments:
    """One segment per sequence: the row positions of its keys (its prompt's copy, then its completion) and of the
    queries it owns (the completion; the first sequence of a prompt also owns the prompt). Keys are in causal order,
    so each query sees a prefix of its segment's keys. Crosses Ray."""

    query_index: torch.Tensor  # (S, Lq) long: row positions, 0 in padding slots
    key_index: torch.Tensor  # (S, Lk) long
    visible: torch.Tensor  # (S, Lq) long: how many of the segment's keys each query sees; 0 in padding slots
    n_queries: torch.Tensor  # (S,) long
    n_keys: torch.Tensor  # (S,) long
    inverse: torch.Tensor  # (N,) long: row position -> its slot in the (S * Lq) flattened queries

    def to(self, device) -> PrefixSegments:
        return PrefixSegments(*(getattr(self, f.name).to(device) for f in fields(self)))

    def mask(self) -> torch.Tensor:
        """(S, 1, Lq, Lk) bool: key j is visible to query i. A padding query sees key 0, so that its softmax stays
        finite (its output is never read)."""
        slots = torch.arange(self.key_index.shape[1], device=self.visible.device)
        return (slots < self.visible.clamp(min=1)[:, :, None])[:, None]


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
    pos = positions.numpy()
    k_pos = np.where(k_real, pos[k_index], np.iinfo(np.int64).max)
    assert np.where(k_real[:, 1:], np.diff(k_pos, axis=1) > 0, True).all(), "a segment's keys must be in causal order"
    visible = np.where(q_real, (k_pos[:, None, :] <= pos[q_index][:, :, None]).sum(-1), 0)
    return PrefixSegments(*map(torch.from_numpy, (q_index, k_index, visible, n_q.astype(np.int64),
                                                  n_k.astype(np.int64), inverse)))


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            prefix_segments: PrefixSegments | None = None, **_):
    """AttentionInterface function. query (1, H, N, D), key/value (1, Hkv, N, D) over the shared row, after the
    rotary embedding; returns (1, N, H, D) as transformers' own attention functions do."""
    if prefix_segments is None:
        raise RuntimeError(f"attention {ATTENTION!r} needs prefix_segments (use shared_prefix_forward)")
    seg = prefix_segments
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, heads, D)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if not dropout and _kernel_runs(q, k, v):
        return kernel_attention(q, k, v, seg, scale).unsqueeze(0), None
    return torch_attention(q, k, v, seg, scale, dropout).unsqueeze(0), None


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: PrefixSegments, scale: float,
                    dropout: float = 0.0) -> torch.Tensor:
    """q (N, H, D), k and v (N, Hkv, D) -> (N, H, D) with torch's attention: each segment's queries and keys
    gathered into padded blocks, masked. Any device and dtype; the CPU kernel computes the same function."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
    out = F.scaled_dot_product_attention(q[seg.query_index].transpose(1, 2), k[seg.key_index].transpose(1, 2),
                                         v[seg.key_index].transpose(1, 2), attn_mask=seg.mask(), dropout_p=dropout,
                                         scale=scale)  # (S, H, Lq, D)
    S, H, Lq, D = out.shape
    return out.transpose(1, 2).reshape(S * Lq, H, D)[seg.inverse]


# ------------------------------------------------------------------ the CPU kernel (posttrain/kernels)


def _kernel():
    from posttrain import kernels

    return kernels.load("shared_prefix_attention")


def _kernel_runs(*tensors: torch.Tensor) -> bool:
    """float32 on CPU, a head size the kernel is built for, and the kernel built (else torch's attention computes
    the same function)."""
    from posttrain.kernels import HEAD_DIMS

    return (tensors[0].shape[-1] in HEAD_DIMS and _kernel() is not None
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: PrefixSegments,
                     scale: float) -> torch.Tensor:
    """torch_attention's function computed by the C++ kernel (float32, CPU; differentiable): each segment reads
    its rows in place, with no gathered copies and no mask."""
    return _KernelAttention.apply(q, k, v, seg, scale)


def _segment_args(seg: PrefixSegments) -> list:
    for t in (seg.query_index, seg.key_index, seg.visible, seg.n_queries, seg.n_keys):
        assert t.dtype == torch.long and t.is_contiguous() and t.device.type == "cpu"
    return [seg.query_index.data_ptr(), seg.key_index.data_ptr(), seg.visible.data_ptr(), seg.n_queries.data_ptr(),
            seg.n_keys.data_ptr(), seg.query_index.shape[0], seg.query_index.shape[1], seg.key_index.shape[1]]


def _check(status: int, head_dim: int) -> None:
    if status != 0:  # _kernel_runs keeps other head sizes away
        raise ValueError(f"the shared-prefix attention kernel has no build for head size {head_dim}")


class _KernelAttention(torch.autograd.Function):
    """q (N, H, D), k and v (N, Hkv, D) -> (N, H, D): the kernel's forward, and its backward for autograd."""

    @staticmethod
    def forward(ctx, q, k, v, seg: PrefixSegments, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        (N, H, D), Hkv = q.shape, k.shape[1]
        out, lse = torch.empty_like(q), q.new_empty((N, H))
        _check(_kernel().spa_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), H, Hkv, D, *_segment_args(seg), scale,
                                     out.data_ptr(), lse.data_ptr()), D)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.seg, ctx.scale = seg, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        (_, H, D), Hkv = q.shape, k.shape[1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        _check(_kernel().spa_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                      grad_out.data_ptr(), H, Hkv, D, *_segment_args(ctx.seg), ctx.scale,
                                      dq.data_ptr(), dk.data_ptr(), dv.data_ptr()), D)
        return dq, dk, dv, None, None


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
