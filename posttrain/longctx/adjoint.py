"""Gradient engines for the selective SSM, behind one interface: `loss_and_grad(model, ids, labels, engine)`.

  autograd    backprop through the whole graph (the reference)
  checkpoint  backprop with per-layer activation checkpointing (the usual memory baseline)
  adjoint     adjoint sharding, exact: per layer k, the cotangent G_k = dL/dy_k is carried down the stack, the
              adjoint state is summed over output positions first by a reverse scan,
                  mu_i = G_i C_i + a_{i+1} * mu_{i+1}           (= dL/dh_i)
              and then each token's networks take ONE vector-Jacobian product: 3T VJPs per layer, batched over time
              chunks so transient memory is bounded by the chunk. With `window` T̄ only the paths from A_i, B_i to
              losses at most T̄-1 steps later are kept (truncated adjoint sharding), still O(T):
                  mu_i(T̄) = mu_i - (a_{i+1} ... a_{i+T̄}) * mu_{i+T̄}
  literal     the paper's double sum (Prop. 3 / Eq. 6): one VJP per (loss t, input i <= t), T(T+1)/2 per network
              and layer, or T̄T - T̄(T̄-1)/2 with a window. O(T^2): an oracle for small T.

The forward of the adjoint engines runs without autograd and keeps only each layer's input x and state h; the
backward recomputes a and C from x one layer at a time (its VJPs rebuild those small networks anyway). The
paper uses the top-of-stack gradient g = dL/dy_K for every layer; that equals backprop only for K = 1 (for K > 1 it
is backprop with each layer's input detached). It is kept as `cotangent="top"` for comparison; the default,
`cotangent="per_layer"`, is the exact gradient.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn.functional as F

from posttrain.longctx.ssm import (IGNORE, SelectiveSSMForCausalLM, SSMBlock, at_least_fp32, linear_scan,
                                   next_token_targets, reverse_scan, shift_right)

EngineKind = Literal["autograd", "checkpoint", "adjoint", "literal"]


@dataclass(frozen=True)
class Engine:
    kind: EngineKind = "adjoint"
    window: int | None = None  # T̄: truncate paths longer than this many tokens (adjoint, literal)
    chunk: int = 256  # tokens per batched VJP (and per head/loss chunk)
    cotangent: Literal["per_layer", "top"] = "per_layer"  # "top": the paper's Eq. 6 (not the gradient for K > 1)

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.kind in ("autograd", "checkpoint") and (self.window is not None or self.cotangent != "per_layer"):
            raise ValueError(f"{self.kind} computes the plain gradient: window and cotangent apply to adjoint/literal")


@dataclass
class GradResult:
    loss: float
    targets: int  # labelled tokens the loss averages over
    vjps: Counter = field(default_factory=Counter)  # "A", "B", "C": VJPs per sequence, summed over layers


@dataclass
class Saved:
    """What the adjoint forward keeps of one layer: its input x and the states h. No graph."""

    x: torch.Tensor
    h: torch.Tensor


def loss_and_grad(model: SelectiveSSMForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor,
                  engine: Engine = Engine()) -> GradResult:
    """Set every parameter's .grad to the gradient of the mean next-token loss; return the loss."""
    model.zero_grad(set_to_none=True)
    targets = int((next_token_targets(labels) != IGNORE).sum())
    if engine.kind in ("autograd", "checkpoint"):
        loss = model(input_ids, labels=labels, checkpoint_layers=engine.kind == "checkpoint").loss
        loss.backward()
        return GradResult(loss.item(), targets)
    result = GradResult(0.0, targets)
    saved, y = adjoint_forward(model.blocks, model.embed(input_ids).detach(), engine.chunk)
    grads: dict[torch.nn.Parameter, torch.Tensor] = {}
    result.loss, G = head_backward(model, y, labels, engine.chunk, grads, overwrite=True)
    del y  # G holds its storage
    for k in reversed(range(len(model.blocks))):
        G_in = layer_backward(model.blocks[k], saved.pop(k), G, engine, grads, result.vjps)
        G = G_in if engine.cotangent == "per_layer" else G  # "top": every layer sees g = dL/dy_K
    set_grads(model, input_ids, G, grads)
    return result


def set_grads(model: SelectiveSSMForCausalLM, input_ids: torch.Tensor, G0: torch.Tensor, grads: dict) -> None:
    """Add the embedding's gradient (the cotangent at the bottom, scattered to the rows used) and set every .grad."""
    embed_grad = torch.zeros_like(model.embed.weight)
    embed_grad.index_add_(0, input_ids.flatten(), G0.flatten(0, 1))
    _add(grads, model.embed.weight, embed_grad)
    for p in model.parameters():
        p.grad = grads.get(p, torch.zeros_like(p))


# ------------------------------------------------------------------- forward
@torch.no_grad()
def adjoint_forward(blocks, y: torch.Tensor, chunk: int | None = None) -> tuple[list[Saved], torch.Tensor]:
    """The layer-sequential forward without a graph; returns each layer's Saved and the top output y_K.

    Each layer runs over time chunks with the state carried across their boundaries (folded into the first
    input: h_s = a_s h_{s-1} + u_s), so a, B x and C exist for one chunk at a time: what is held is the stored x
    and h of every layer, plus one chunk."""
    saved = []
    B, T, _ = y.shape
    for block in blocks:
        h = y.new_empty(B, T, block.a_proj.out_features)
        y_next = torch.empty_like(y)
        for sl in _chunks(T, chunk or T):
            log_a, u, c = block.maps(y[:, sl])
            a = log_a.exp()
            if sl.start > 0:
                u[:, 0] += a[:, 0] * h[:, sl.start - 1]
            h[:, sl] = linear_scan(a, u)
            torch.add(y[:, sl], block.readout(c, h[:, sl]), out=y_next[:, sl])
        saved.append(Saved(y, h))
        y = y_next
    return saved, y


def head_backward(model: SelectiveSSMForCausalLM, y: torch.Tensor, labels: torch.Tensor, chunk: int,
                  grads: dict, overwrite: bool = False) -> tuple[float, torch.Tensor]:
    """Loss and g = dL/dy_K, the head's gradients added to `grads`; logits exist one time chunk at a time.

    overwrite: g is written over y chunk by chunk (the top activations are not needed once the head has seen
    them), so the backward starts without a second (B, T, D) tensor."""
    targets = next_token_targets(labels)
    n = max(1, int((targets != IGNORE).sum()))
    g = y if overwrite else torch.zeros_like(y)
    params = [model.norm_f, model.lm_head.weight]
    loss = 0.0
    for s in _chunks(y.shape[1], chunk):
        tc = targets[:, s]
        if not (tc != IGNORE).any():
            g[:, s] = 0
            continue
        yc = y[:, s].clone().requires_grad_()
        part = F.cross_entropy(at_least_fp32(model.head(yc)).flatten(0, 1), tc.flatten(), ignore_index=IGNORE,
                               reduction="sum") / n
        gy, *gp = torch.autograd.grad(part, [yc, *params])
        g[:, s] = gy
        for p, gpi in zip(params, gp):
            _add(grads, p, gpi)
        loss += part.item()
    return loss, g


# ------------------------------------------------------------------ backward
@torch.no_grad()
def layer_backward(block: SSMBlock, s: Saved, G: torch.Tensor, engine: Engine,
                   grads: dict, vjps: Counter) -> torch.Tensor:
    """One layer's parameter gradients (added to `grads`) and its input cotangent dL/dy_{k-1}.

    Time chunks are visited from the last to the first: each chunk's adjoint states come from the reverse scan
    carried in from the chunk after it, then its tokens take their VJPs. With per-layer cotangents G is updated
    in place into dL/dy_{k-1} (a chunk's G is read before it is overwritten, and earlier chunks are untouched), so
    the backward holds one cotangent sequence and one chunk's transients."""
    if engine.kind == "literal":
        return _literal_backward(block, s, G, engine.window, grads, vjps)
    G_in = G if engine.cotangent == "per_layer" else G.clone()  # the residual path, plus the VJPs below
    for sl, mu in adjoint_state_chunks(block, s.x, G, engine.chunk, engine.window):
        G_in[:, sl] += token_vjps(block, s.x[:, sl], s.h[:, sl], (mu * h_prev(s.h, sl), mu, G[:, sl]), grads)
        vjps.update({"A": sl.stop - sl.start, "B": sl.stop - sl.start, "C": sl.stop - sl.start})
    return G_in


@torch.no_grad()
def adjoint_state_chunks(block: SSMBlock, x: torch.Tensor, G: torch.Tensor, chunk: int,
                         window: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """The adjoint states mu_i = dL/dh_i of one layer (with a window, only the losses t < i + T̄ count), yielded
    chunk by chunk from the end of the sequence.

    The recurrence mu_i = G_i C_i + a_{i+1} mu_{i+1} enters a chunk through its last position. A window needs
    mu and the decay products T̄ steps ahead, so the untruncated mu and the float64 suffix sums of log a of the
    next T̄ positions are kept (O(T̄), not O(T))."""
    T = G.shape[1]
    w_out = block.out_proj.weight
    window = None if window is None or window >= T else window
    mu_next = a_next = None  # mu and a at the first position of the chunk after this one
    R_next = None  # R_i = sum_{j > i} log a_j (float64) at that position
    tail_mu = tail_R = tail_log_a = None  # untruncated mu, R and log a of the T̄ positions after this chunk
    for sl in reversed(_chunks(T, chunk)):
        log_a, _, c = block.maps(x[:, sl])
        a = log_a.exp()
        d = c * (G[:, sl] @ w_out)  # G_t C_t = (W_out^T G_t) * c_t
        if mu_next is not None:
            d[:, -1] += a_next * mu_next
        mu = reverse_scan(a, d)
        mu_next, a_next = mu[:, 0], a[:, 0]
        if window is None:
            yield sl, mu
            continue
        # Suffix sums of log a within the chunk, continued from the chunk after it: R_i = R_{i+1} + log a_{i+1}.
        la = log_a.double()
        after = R_next + tail_log_a if R_next is not None else torch.zeros_like(la[:, 0])
        R = after[:, None] + la.flip(1).cumsum(1).flip(1) - la
        R_next, tail_log_a = R[:, 0], la[:, 0]  # R and log a at this chunk's first position
        full_mu = mu if tail_mu is None else torch.cat([mu, tail_mu], 1)
        full_R = R if tail_R is None else torch.cat([R, tail_R], 1)
        # Drop the losses `window` or more steps later: mu_i -= (a_{i+1} ... a_{i+T̄}) mu_{i+T̄}, where i + T̄ < T.
        n = min(sl.stop - sl.start, full_mu.shape[1] - window)
        out = mu.clone()
        if n > 0:
            span = torch.exp(R[:, :n] - full_R[:, window: window + n]).to(mu.dtype)
            out[:, :n] -= span * full_mu[:, window: window + n]
        tail_mu, tail_R = full_mu[:, :window], full_R[:, :window]
        yield sl, out


def token_vjps(block: SSMBlock, x: torch.Tensor, h: torch.Tensor,
               cotangents: tuple[torch.Tensor, torch.Tensor, torch.Tensor], grads: dict) -> torch.Tensor:
    """VJPs of the per-token networks 𝒜, ℬ, 𝒞 at inputs x (one per token and network) with cotangents for
    (a_t, B_t x̂_t, C_t h_t); parameter gradients go into `grads`, the input cotangent is returned."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        log_a, u, c = block.maps(x)
        outs = (log_a.exp(), u, block.readout(c, h))
        params = [p for p in block.parameters()]
        gx, *gp = torch.autograd.grad(outs, [x, *params], cotangents, allow_unused=True)
    for p, g in zip(params, gp):
        if g is not None:
            _add(grads, p, g)
    return gx


@torch.no_grad()
def _literal_backward(block: SSMBlock, s: Saved, G: torch.Tensor, window: int | None,
                      grads: dict, vjps: Counter) -> torch.Tensor:
    """Eq. 6 term by term: for each loss position t, the VJPs of 𝒜 and ℬ at every input i in its window with
    cotangent (G_t lambda^{t,i}) * h_{i-1} and G_t lambda^{t,i}, lambda^{t,i} = C_t a_t ... a_{i+1}; and 𝒞 at t."""
    log_a, _, c = block.maps(s.x)
    a = log_a.exp()
    direct = c * (G @ block.out_proj.weight)  # G_t C_t
    h_prev = shift_right(s.h)
    G_in = G.clone()
    zero = torch.zeros_like
    for t in range(G.shape[1]):
        lo = 0 if window is None else max(0, t - window + 1)
        # a_t ... a_{i+1} for i = lo..t (empty product 1 at i = t), by a reversed cumulative product.
        tail = torch.cumprod(a[:, lo + 1: t + 1].flip(1), dim=1).flip(1)
        decay = torch.cat([tail, torch.ones_like(a[:, :1])], dim=1)
        lam = direct[:, t: t + 1] * decay  # (B, t - lo + 1, N)
        i = slice(lo, t + 1)
        G_in[:, i] += token_vjps(block, s.x[:, i], s.h[:, i], (lam * h_prev[:, i], lam, zero(G[:, i])), grads)
        G_in[:, t: t + 1] += token_vjps(block, s.x[:, t: t + 1], s.h[:, t: t + 1],
                                        (zero(a[:, t: t + 1]), zero(a[:, t: t + 1]), G[:, t: t + 1]), grads)
        vjps.update({"A": t + 1 - lo, "B": t + 1 - lo, "C": 1})
    return G_in


# ------------------------------------------------------------------- helpers
def h_prev(h: torch.Tensor, sl: slice) -> torch.Tensor:
    """h_{t-1} for the positions t in `sl` (h_{-1} = 0)."""
    return h[:, sl.start - 1: sl.stop - 1] if sl.start > 0 else shift_right(h[:, sl])


def _chunks(T: int, size: int) -> list[slice]:
    return [slice(s, min(T, s + size)) for s in range(0, T, size)]


def _add(grads: dict, p: torch.nn.Parameter, g: torch.Tensor) -> None:
    grads[p] = g if p not in grads else grads[p] + g


def vjp_count(kind: str, T: int, window: int | None = None) -> dict[str, int]:
    """The VJPs per layer and sequence of each engine (the paper's counts for the literal form)."""
    if kind == "adjoint":
        return {"A": T, "B": T, "C": T}
    w = T if window is None else min(window, T)
    pairs = w * T - w * (w - 1) // 2  # T(T+1)/2 when w = T
    return {"A": pairs, "B": pairs, "C": T}
