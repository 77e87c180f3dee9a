"""From rows to padded token micro-batches for the learners.

Data order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would. Within one optimizer step the sequences are sorted by length before
being cut into micro-batches, so each micro-batch pads only to its own longest sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch

from posttrain.models.shared_prefix import PrefixSegments, build_segments


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # tokens before the completion; the loss covers input_ids[n_prompt:]


@dataclass
class TokenBatch:
    """A right-padded micro-batch. Crosses Ray as one object."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) float: 1 on completion tokens

    @property
    def n_target_tokens(self) -> int:
        return int(self.loss_mask[:, 1:].sum().item())


def render_prompt(tokenizer: Any, row: dict[str, Any]) -> str:
    """The prompt text: as written, or the chat history rendered with the tokenizer's template."""
    if row.get("messages"):
        messages = json.loads(row["messages"])
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return row["prompt"]


def encode_prompt(tokenizer: Any, row: dict[str, Any]) -> list[int]:
    # Chat templates already hold the special tokens they want; plain prompts get the tokenizer's defaults.
    text = render_prompt(tokenizer, row)
    return tokenizer(text, add_special_tokens=not row.get("messages"))["input_ids"]


def encode_example(tokenizer: Any, row: dict[str, Any], max_length: int) -> tuple[Example, bool]:
    """Prompt and completion tokenised separately (as the sampler sees them), then eos.

    Returns the example and whether it was truncated to max_length.
    """
    prompt = encode_prompt(tokenizer, row)
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt + completion
    return Example(ids[:max_length], min(len(prompt), max_length)), len(ids) > max_length


def collate(examples: list[Example], pad_id: int) -> TokenBatch:
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    loss = torch.zeros((len(examples), T), dtype=torch.float32)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        loss[i, e.n_prompt : n] = 1.0
    return TokenBatch(ids, attn, loss)


def step_indices(n_rows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step`: consecutive slices of per-epoch permutations."""
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return out


def shard_step(examples: list[Example], world_size: int, micro_batch_size: int, pad_id: int) -> list[list[TokenBatch]]:
    """Split one optimizer step's examples into [rank][micro-batch] TokenBatches.

    Sorted by length so micro-batches are length-homogeneous (little padding); micro-batches are
    dealt round-robin to ranks so every rank gets the same number (DeepSpeed steps in lockstep).
    """
    per_rank = len(examples) // world_size
    if per_rank * world_size != len(examples) or per_rank % micro_batch_size:
        raise ValueError(f"batch of {len(examples)} does not split into {world_size} ranks x micro-batches of {micro_batch_size}")
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    micro = [ordered[i : i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
    return [[collate(mb, pad_id) for mb in micro[r::world_size]] for r in range(world_size)]


def micro_batches(examples: list[Example], micro_batch_size: int, pad_id: int) -> list[TokenBatch]:
    """Length-sorted micro-batches for evaluation (no lockstep needed)."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [collate(ordered[i : i + micro_batch_size], pad_id) for i in range(0, len(ordered), micro_batch_size)]


# ---------------------------------------------------------------- preference pairs


@dataclass
class PairExample:
    chosen: Example
    rejected: Example  # same prompt tokens as `chosen`
    ref_chosen: float | None = None  # summed reference log-probs of the completions (filled before training)
    ref_rejected: float | None = None
    kl: Example | None = None  # KTO: this prompt with another pair's response, for the KL reference point
    ref_kl: float | None = None

    def sequences(self) -> list[Example]:
        return [self.chosen, self.rejected] + ([self.kl] if self.kl is not None else [])

    def references(self) -> list[float | None]:
        return [self.ref_chosen, self.ref_rejected] + ([self.ref_kl] if self.kl is not None else [])

    def set_references(self, logps: list[float]) -> None:
        self.ref_chosen, self.ref_rejected = logps[0], logps[1]
        if self.kl is not None:
            self.ref_kl = logps[2]


def attach_mismatched(pairs: list[PairExample], max_length: int) -> None:
    """KTO's KL examples: pair k's prompt with pair k+1's chosen response (cyclically), cut to max_length.

    Fixed per data set rather than drawn per batch, so their reference log-probs can be computed once.
    """
    for k, p in enumerate(pairs):
        other = pairs[(k + 1) % len(pairs)].chosen
        prompt = p.chosen.input_ids[: p.chosen.n_prompt]
        response = other.input_ids[other.n_prompt :][: max(1, max_length - len(prompt))]
        p.kl = Example(prompt + response, len(prompt))


@dataclass
class PackedBatch:
    """Sequences laid end to end in rows, with no padding between them (padding-free), for per-sequence log-probs.

    position_ids restart at 0 at every sequence: Hugging Face models read that (with no attention mask)
    as a block-diagonal causal mask, so a sequence attends only to itself, exactly as if it were alone.
    Only the positions that predict a completion token reach the vocabulary projection (`logits_to_keep`).

    With `segments` (pack_shared_prefix), R = 1 and sequences with the same prompt share one copy of it; attention
    then needs models/shared_prefix.py. Crosses Ray as one object.
    """

    input_ids: torch.Tensor  # (R, T) long; a row's unused tail is pad tokens, a segment of its own
    position_ids: torch.Tensor  # (R, T) long
    logits_to_keep: torch.Tensor  # (R, T) bool: t predicts a completion token; or (K,) long row positions
    target_ids: torch.Tensor  # (K,) long: the predicted tokens, in logits_to_keep's (row-major) order
    target_seq: torch.Tensor  # (K,) long: which sequence (index into the packed list) each target belongs to
    n_seqs: int
    segments: PrefixSegments | None = None

    def model_inputs(self, device) -> dict[str, Any]:
        """The model's keyword arguments; its logits come out (K, V) after flatten(0, -2)."""
        kw = {"input_ids": self.input_ids.to(device), "position_ids": self.position_ids.to(device),
              "logits_to_keep": self.logits_to_keep.to(device), "use_cache": False}
        if self.segments is not None:
            kw["prefix_segments"] = self.segments.to(device)
        return kw

    def kept(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, T, ...) per-position outputs -> (K, ...) at the positions that predict the targets."""
        keep = self.logits_to_keep.to(hidden.device)
        return hidden[keep] if keep.dtype == torch.bool else hidden[0, keep]


def pack(examples: list[Example], pad_id: int, capacity: int | None) -> PackedBatch:
    """Pack sequences into rows of at most `capacity` tokens, first-fit by decreasing length.

    capacity None: one sequence per row (plain right padding, same outputs). Sequence i of `examples`
    keeps index i in target_seq, wherever it is placed.
    """
    order = list(range(len(examples)))
    if capacity is not None:
        order.sort(key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        if capacity is not None and n > capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit a row of {capacity}")
        slot = next((r for r, free in enumerate(room) if free >= n), None) if capacity is not None else None
        if slot is None:
            rows.append([])
            room.append((capacity or n) - n)
            slot = len(rows) - 1
        else:
            room[slot] -= n
        rows[slot].append(i)
    T = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)  # the tail padding is one more segment (restarts at 0)
    keep = torch.zeros((len(rows), T), dtype=torch.bool)
    seq = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = examples[i]
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            pos[r, at : at + n] = torch.arange(n)
            pos[r, at + n :] = torch.arange(T - at - n)
            keep[r, at + max(e.n_prompt, 1) - 1 : at + n - 1] = True  # position t predicts completion token t+1
            seq[r, at : at + n] = i
            at += n
    shifted = torch.full_like(ids, pad_id)
    shifted[:, :-1] = ids[:, 1:]
    return PackedBatch(ids, pos, keep, shifted[keep], seq[keep], len(examples))


def pack_shared_prefix(examples: list[Example]) -> PackedBatch:
    """All sequences in one row with no padding, each distinct prompt laid out once (models/shared_prefix.py).

    A prompt's copy is followed by the completions of every sequence with that prompt; a completion's positions
    continue from its prompt's. The first completion token of each is predicted by the last prompt position,
    shared by the group. A completion's last token predicts nothing and no later token reads it, so it is left out
    of the row (it stays a target). Sequence i keeps index i in target_seq. An empty prompt counts the first token
    as it.
    """
    ids: list[int] = []
    pos: list[int] = []
    copies: dict[tuple[int, ...], list[int]] = {}  # prompt -> its row positions
    queries: list[list[int]] = []
    keys: list[list[int]] = []
    keep: list[int] = []
    targets: list[int] = []
    seq: list[int] = []
    for i, e in enumerate(examples):
        n_prompt = max(e.n_prompt, 1)
        prompt, completion = tuple(e.input_ids[:n_prompt]), e.input_ids[n_prompt:]
        owned = []
        if prompt not in copies:  # the first sequence of a prompt owns its queries
            copies[prompt] = owned = list(range(len(ids), len(ids) + n_prompt))
            ids += prompt
            pos += range(n_prompt)
        laid = completion[:-1]
        own = list(range(len(ids), len(ids) + len(laid)))
        ids += laid
        pos += range(n_prompt, n_prompt + len(laid))
        if owned or own:
            queries.append(owned + own)
            keys.append(copies[prompt] + own)
        keep += [copies[prompt][-1]] + own if completion else []
        targets += completion
        seq += [i] * len(completion)
    positions = torch.tensor(pos, dtype=torch.long)
    return PackedBatch(torch.tensor([ids], dtype=torch.long), positions[None], torch.tensor(keep, dtype=torch.long),
                       torch.tensor(targets, dtype=torch.long), torch.tensor(seq, dtype=torch.long), len(examples),
                       build_segments(queries, keys, positions))


@dataclass
class PairBatch:
    """P pairs as packed sequences: the P chosen completions, then the P rejected ones (then, for KTO, the P
    mismatched KL sequences)."""

    tokens: PackedBatch
    ref_logps: torch.Tensor | None  # (2P or 3P,) in the same order, or None before the reference pass
    n_pairs: int


def collate_pairs(pairs: list[PairExample], pad_id: int, capacity: int | None = None) -> PairBatch:
    """capacity: pack into rows of that many tokens (padding-free); None: one sequence per padded row."""
    columns = list(zip(*(p.sequences() for p in pairs)))  # [chosen...], [rejected...], ([kl...])
    tokens = pack([e for col in columns for e in col], pad_id, capacity)
    refs = list(zip(*(p.references() for p in pairs)))
    if any(r is None for col in refs for r in col):
        return PairBatch(tokens, None, len(pairs))
    return PairBatch(tokens, torch.tensor([r for col in refs for r in col], dtype=torch.float32), len(pairs))


def deal_pairs(pairs: list[PairExample], world_size: int, micro_batch_size: int) -> list[list[list[PairExample]]]:
    """One optimizer step's pairs as [rank][micro-batch] lists: length-sorted, dealt round-robin to ranks."""
    return deal(pairs, world_size, micro_batch_size, lambda p: max(len(p.chosen.input_ids), len(p.rejected.input_ids)))


def shard_pairs(pairs: list[PairExample], world_size: int, micro_batch_size: int, pad_id: int,
                capacity: int | None = None) -> list[list[PairBatch]]:
    """One optimizer step's pairs as [rank][micro-batch] PairBatches."""
    return [[collate_pairs(mb, pad_id, capacity) for mb in rank] for rank in deal_pairs(pairs, world_size, micro_batch_size)]


def collate_pair_rows(pairs: list[PairExample], pad_id: int) -> TokenBatch:
    """P pairs as 2P right-padded rows, chosen first (reward models read each row's last token)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


# ---------------------------------------------------------------- online RL


@dataclass
class RLSample:
    """One sampled completion and what the loop knows about each of its tokens (lists of len(completion))."""

    prompt: list[int]
    completion: list[int]
    sampler_logps: list[float]  # from the sampler, at sampling time
    advantages: list[float] | None = None  # per token (GRPO/RLOO: the sample's advantage on every token)
    old_logps: list[float] | None = None  # the learner's, before this batch's updates (the PPO ratio's denominator)
    ref_logps: list[float] | None = None  # the reference policy's (KL)
    old_values: list[float] | None = None  # PPO: the critic's, before this batch's updates
    returns: list[float] | None = None  # PPO: the critic's regression targets


RL_TOKEN_FIELDS = ("sampler_logps", "advantages", "old_logps", "ref_logps", "old_values", "returns")


@dataclass
class RLBatch:
    """Packed sequences plus per-token tensors (K,) in the packed targets' order. Crosses Ray as one object."""

    tokens: PackedBatch
    target_pos: torch.Tensor  # (K,) long: each target's index within its completion
    fields: dict[str, torch.Tensor]  # name -> (K,) float32, for the RL_TOKEN_FIELDS the samples carry

    @property
    def n_tokens(self) -> int:
        return int(self.target_pos.numel())

    def padded(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) in target order -> (N, T) by sequence and completion position, and the (N, T) mask."""
        return scatter_padded(flat, self.tokens.target_seq.to(flat.device), self.target_pos.to(flat.device),
                              self.tokens.n_seqs)


def scatter_padded(flat: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = int(pos.max().item()) + 1 if pos.numel() else 1
    out = flat.new_zeros((n_seqs, T))
    mask = torch.zeros((n_seqs, T), dtype=flat.dtype, device=flat.device)
    out = out.index_put((seq, pos), flat)  # out-of-place: autograd flows from `out` back to `flat`
    mask[seq, pos] = 1
    return out, mask


def target_positions(tokens: PackedBatch) -> torch.Tensor:
    """Index of each packed target within its own completion: a sequence's targets are contiguous and in order."""
    seq = tokens.target_seq
    k = torch.arange(seq.numel())
    first = torch.full((tokens.n_seqs,), seq.numel(), dtype=torch.long).scatter_reduce(0, seq, k, "amin")
    return k - first[seq]


def collate_rl(samples: list[RLSample], pad_id: int, capacity: int | None, shared_prefix: bool = False) -> RLBatch:
    """capacity: rows of that many tokens (None: one sequence per row); shared_prefix: pack_shared_prefix instead."""
    examples = [Example(s.prompt + s.completion, len(s.prompt)) for s in samples]
    tokens = pack_shared_prefix(examples) if shared_prefix else pack(examples, pad_id, capacity)
    pos = target_positions(tokens)
    fields = {}
    for name in RL_TOKEN_FIELDS:
        values = [getattr(s, name) for s in samples]
        if any(v is None for v in values):
            continue
        fields[name] = pad_rows(values)[0][tokens.target_seq, pos]
    return RLBatch(tokens, pos, fields)


def pad_rows(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token lists of different lengths -> (N, T) float32 right-padded with 0, and the (N, T) mask of real ones."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    real = np.arange(lengths.max(initial=0)) < lengths[:, None]  # row-major: the rows' values in order
    grid = np.zeros(real.shape, dtype=np.float32)
    grid[real] = np.fromiter(chain.from_iterable(rows), dtype=np.float32, count=int(lengths.sum()))
    return torch.from_numpy(grid), torch.from_numpy(real.astype(np.float32))


def deal(items: list, world_size: int, micro_batch_size: int, length) -> list[list[list]]:
    """[rank][micro-batch] lists: sorted by `length` so micro-batches are homogeneous, dealt round-robin to ranks
    (every rank gets the same number of micro-batches; DeepSpeed steps in lockstep)."""
    per_rank = len(items) // world_size
    if per_rank * world_size != len(items) or per_rank % micro_batch_size:
        raise ValueError(f"{len(items)} items do not split into {world_size} ranks x micro-batches of {micro_batch_size}")
    ordered = sorted(items, key=length)
    micro = [ordered[i : i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
    return [micro[r::world_size] for r in range(world_size)]


def deal_even(items: list, world: int, gas: int, length=lambda s: len(s.prompt) + len(s.completion)) -> list[list[list]]:
    """[rank][micro-batch]: items sorted by `length` in world * gas near-equal micro-batches, dealt round-robin to
    ranks (every rank runs gas micro-batches; sizes differ by at most one when the count does not divide)."""
    ordered = sorted(items, key=length)
    micro = [list(c) for c in np.array_split(np.arange(len(ordered)), world * gas)]
    return [[[ordered[i] for i in micro[m]] for m in range(r, world * gas, world)] for r in range(world)]


def deal_groups(samples: list[RLSample], world: int, gas: int) -> list[list[list[RLSample]]]:
    """[rank][micro-batch] like deal_even (the same near-equal sizes), but samples with the same prompt stay
    together as far as the sizes allow, so a micro-batch lays each prompt out once (pack_shared_prefix), and
    micro-batches carry near-equal tokens: groups go largest first to the micro-batch with the fewest tokens and
    room, and a group that fits nowhere whole fills the emptiest one's room and goes on with its rest."""
    groups: dict[tuple[int, ...], list[RLSample]] = {}
    for s in samples:
        groups.setdefault(tuple(s.prompt), []).append(s)
    cost = lambda g: len(g[0].prompt) + sum(len(s.completion) for s in g)  # tokens laid out, prompt once
    M = world * gas
    room = [len(c) for c in np.array_split(np.arange(len(samples)), M)]
    micro: list[list[RLSample]] = [[] for _ in range(M)]
    load = [0] * M
    for group in sorted(groups.values(), key=cost, reverse=True):  # stable: ties keep first-seen order
        while group:
            fits = [m for m in range(M) if room[m] >= len(group)]
            m = min(fits or [m for m in range(M) if room[m]], key=lambda m: (load[m], m))
            part, group = group[: room[m]], group[room[m] :]
            micro[m] += part
            room[m] -= len(part)
            load[m] += cost(part)
    return [[micro[m] for m in range(r, M, world)] for r in range(world)]


@dataclass(frozen=True)
class Packing:
    """How online RL lays out the learners' micro-batches.

    shared_prefix: every model the learners hold runs models/shared_prefix.py exactly, so each micro-batch lays out
    a prompt once for all its completions (groups of 8, 8-token prompts, about 25-token completions: the learners'
    compute per step fell by about a quarter in the GRPO benchmark on CPU). Otherwise rows as long as the longest
    sequence: no row's attention spans more than that (longer rows cost more in attention than their padding saved,
    on CPU)."""

    pad_id: int
    shared_prefix: bool

    def batch(self, samples: list[RLSample]) -> RLBatch:
        if self.shared_prefix:
            return collate_rl(samples, self.pad_id, None, shared_prefix=True)
        return collate_rl(samples, self.pad_id, max(len(s.prompt) + len(s.completion) for s in samples))

    def deal(self, samples: list[RLSample], world: int, gas: int) -> list[list[list[RLSample]]]:
        return deal_groups(samples, world, gas) if self.shared_prefix else deal_even(samples, world, gas)

    def order(self, samples: list[RLSample]) -> list[int]:
        """Sample indices with each prompt's samples together (shared prefix), else by length."""
        if self.shared_prefix:
            first: dict[tuple[int, ...], int] = {}
            return sorted(range(len(samples)), key=lambda i: first.setdefault(tuple(samples[i].prompt), i))
        return sorted(range(len(samples)), key=lambda i: len(samples[i].prompt) + len(samples[i].completion))
