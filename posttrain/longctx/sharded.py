"""Adjoint gradients with the work split across Ray workers.

Two splits, both giving the single-process gradient (the reduction is a sum of the same terms):

  layers  each worker owns a contiguous block of layers (the paper's Algorithm 4 layout): it runs its layers'
          forward, keeps their x and h itself, and in the backward turns the cotangent arriving from the
          layer above into its parameter gradients and the cotangent for the block below (so the exact per-layer
          cotangent crosses worker boundaries). Memory for activations is split across workers.
  time    the driver runs the forward and each layer's reverse scan (O(T N), cheap); the per-token VJPs, the bulk of
          the work, are split into time chunks across the workers, which return summed parameter gradients and the
          input cotangent of their chunks.

The workers are thin: they hold copies of the blocks and call the functions of `adjoint.py`.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import torch

from posttrain.longctx.adjoint import (Engine, GradResult, Saved, _add, adjoint_forward, adjoint_state_chunks,
                                       h_prev, head_backward, layer_backward, set_grads, token_vjps)
from posttrain.longctx.ssm import IGNORE, SelectiveSSMConfig, SelectiveSSMForCausalLM, SSMBlock, next_token_targets

Split = Literal["layers", "time"]


class AdjointShard:
    """A Ray worker holding copies of some SSM blocks (their weights are refreshed before every step)."""

    def __init__(self, config: dict, layers: list[int], threads: int = 1, dtype: str = "float32"):
        torch.set_num_threads(threads)
        cfg = SelectiveSSMConfig(**config)
        self.layers = layers
        self.blocks = torch.nn.ModuleList(SSMBlock(cfg) for _ in layers).to(getattr(torch, dtype))
        self.saved: list[Saved] = []

    def set_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.blocks.load_state_dict(state)

    # -- split by layers
    def forward(self, y: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        self.saved, y = adjoint_forward(self.blocks, y, chunk)
        return y

    def backward(self, G: torch.Tensor, engine: Engine) -> tuple[torch.Tensor, dict[str, torch.Tensor], Counter]:
        grads: dict = {}
        vjps: Counter = Counter()
        G = G.clone()  # the backward updates it in place; an object from Ray's store may be read-only
        for k in reversed(range(len(self.blocks))):
            G_in = layer_backward(self.blocks[k], self.saved.pop(k), G, engine, grads, vjps)
            G = G_in if engine.cotangent == "per_layer" else G
        names = {p: n for n, p in self.blocks.named_parameters()}
        return G, {names[p]: g for p, g in grads.items()}, vjps

    # -- split by time
    def chunk_vjps(self, index: int, chunks: list[tuple[torch.Tensor, ...]]) -> tuple[dict, list[torch.Tensor]]:
        """VJPs of block `index` (its position in self.blocks) over time chunks of (x, h, a-cotangent, mu, G)."""
        block = self.blocks[index]
        grads: dict = {}
        gxs = [token_vjps(block, x, h, (ca, mu, G), grads) for x, h, ca, mu, G in chunks]
        names = {p: n for n, p in block.named_parameters()}
        return {names[p]: g for p, g in grads.items()}, gxs


def layer_blocks(num_layers: int, workers: int) -> list[list[int]]:
    """Contiguous, nearly equal blocks of layers, one per worker (the first ones take the remainder)."""
    base, extra = divmod(num_layers, workers)
    out, start = [], 0
    for w in range(workers):
        n = base + (w < extra)
        out.append(list(range(start, start + n)))
        start += n
    return [b for b in out if b]


def shard_args(model: SelectiveSSMForCausalLM, workers: int, split: Split) -> list[tuple]:
    """AdjointShard constructor arguments: one worker per block of layers, or `workers` holding every layer."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k in SelectiveSSMConfig().to_dict()}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return [(cfg, layers, 1, dtype) for layers in _shard_layers(model, workers, split)]


def start_shards(model: SelectiveSSMForCausalLM, workers: int, split: Split, cpus: float = 1.0) -> list:
    """Ray actors for `split` on the running Ray (the stage places them with cluster.spawn instead)."""
    import ray

    remote = ray.remote(AdjointShard)
    return [remote.options(num_cpus=cpus).remote(*args) for args in shard_args(model, workers, split)]


def sharded_loss_and_grad(model: SelectiveSSMForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor,
                          engine: Engine, shards: list, split: Split) -> GradResult:
    """`adjoint.loss_and_grad` with the layer work on Ray workers; sets every parameter's .grad on `model`."""
    import ray

    if engine.kind != "adjoint":
        raise ValueError(f"the sharded engines compute adjoint gradients, not {engine.kind!r}")
    layouts = _shard_layers(model, len(shards), split)
    ray.get([s.set_weights.remote(_block_state(model, layers)) for s, layers in zip(shards, layouts)])
    model.zero_grad(set_to_none=True)
    grads: dict = {}
    result = GradResult(0.0, int((next_token_targets(labels) != IGNORE).sum()))
    y = model.embed(input_ids).detach()
    if split == "layers":
        for s in shards:
            y = ray.get(s.forward.remote(y, engine.chunk))
        result.loss, G = head_backward(model, y, labels, engine.chunk, grads)
        for s, layers in reversed(list(zip(shards, layouts))):
            G, block_grads, vjps = ray.get(s.backward.remote(G, engine))
            _collect(model, layers, block_grads, grads)
            result.vjps.update(vjps)
    else:
        saved, y = adjoint_forward(model.blocks, y, engine.chunk)
        result.loss, G = head_backward(model, y, labels, engine.chunk, grads, overwrite=True)
        for k in reversed(range(len(model.blocks))):
            G_in = _time_split_layer(model, k, saved.pop(k), G, engine, shards, grads)
            result.vjps.update({key: G.shape[1] for key in "ABC"})
            G = G_in if engine.cotangent == "per_layer" else G
    set_grads(model, input_ids, G, grads)
    return result


def _time_split_layer(model, k: int, s: Saved, G: torch.Tensor, engine: Engine, shards: list,
                      grads: dict) -> torch.Tensor:
    import ray

    parts = [(sl, (s.x[:, sl], s.h[:, sl], mu * h_prev(s.h, sl), mu, G[:, sl]))
             for sl, mu in adjoint_state_chunks(model.blocks[k], s.x, G, engine.chunk, engine.window)]
    mine = [parts[i::len(shards)] for i in range(len(shards))]  # round robin: equal work per worker
    outs = ray.get([w.chunk_vjps.remote(k, [p for _, p in m]) for w, m in zip(shards, mine) if m])
    G_in = G.clone()
    for m, (block_grads, gxs) in zip([m for m in mine if m], outs):
        for (sl, _), gx in zip(m, gxs):
            G_in[:, sl] += gx
        _collect(model, [k], {f"0.{n}": g for n, g in block_grads.items()}, grads)
    return G_in


def _shard_layers(model, workers: int, split: Split) -> list[list[int]]:
    n = len(model.blocks)
    return layer_blocks(n, workers) if split == "layers" else [list(range(n))] * workers


def _block_state(model, layers: list[int]) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach() for i, k in enumerate(layers) for n, p in model.blocks[k].named_parameters()}


def _collect(model, layers: list[int], block_grads: dict[str, torch.Tensor], grads: dict) -> None:
    """Map a worker's gradients ("<position in its blocks>.<param>") onto the model's parameters."""
    for name, g in block_grads.items():
        i, param = name.split(".", 1)
        _add(grads, model.blocks[layers[int(i)]].get_parameter(param), g)
