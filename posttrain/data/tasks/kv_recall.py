"""Synthetic long-document recall: a key-value pair stated early, asked about after many filler tokens.

    <bos> f f ... <kv> k v f f f ... (distance filler tokens) ... f <query> k  -> v

Token ids: 0 <pad>, 1 <bos>, 2 <kv>, 3 <query>, then keys, values and filler words. The answer v is the only
labelled token, so a model must carry it across `distance` tokens (drawn from [min_distance, max_distance]);
chance accuracy is 1 / n_values. With `bos: false` the document opens with filler (a token always T-1 steps
before the loss lies outside every truncation window shorter than the document, so it never trains). Rows are
token ids (no tokenizer): columns id, input_ids, labels, answer, distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `datasets`/numpy load only when splits are built: recipes import KVRecallConfig cheaply
    import datasets

PAD, BOS, KV, QUERY = 0, 1, 2, 3
IGNORE = -100


@dataclass
class KVRecallConfig:
    n_keys: int = 8
    n_values: int = 16
    n_filler: int = 32
    seq_len: int = 1024  # tokens per document, the answer included
    min_distance: int = 200  # tokens from the value to the query (the path the fact must travel)
    max_distance: int = 900
    n_train: int = 4096
    n_test: int = 512
    seed: int = 0
    bos: bool = True  # <bos> at position 0 (false: the document opens with filler)

    def __post_init__(self) -> None:
        for name in ("n_keys", "n_values", "n_filler", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_train < 0:
            raise ValueError(f"n_train must be >= 0, got {self.n_train}")
        if not 1 <= self.min_distance <= self.max_distance:
            raise ValueError(f"need 1 <= min_distance <= max_distance, got {self.min_distance}, {self.max_distance}")
        if self.max_distance + 4 > self.seq_len:
            raise ValueError(f"seq_len {self.seq_len} must be >= max_distance + 4 ({self.max_distance + 4}): "
                             "<bos>, <kv> k v ... <query> k and the answer")

    @property
    def vocab_size(self) -> int:
        return 4 + self.n_keys + self.n_values + self.n_filler


def build_splits(cfg: KVRecallConfig) -> datasets.DatasetDict:
    """train and test, disjoint draws from one seeded generator (test first, so it depends only on n_test)."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(_documents(cfg, n, rng, split))
                                 for split, n in (("test", cfg.n_test), ("train", cfg.n_train))})


def _documents(cfg: KVRecallConfig, n: int, rng, split: str) -> dict[str, list]:
    import numpy as np

    T = cfg.seq_len
    key0, value0, filler0 = 4, 4 + cfg.n_keys, 4 + cfg.n_keys + cfg.n_values
    ids = rng.integers(filler0, filler0 + cfg.n_filler, size=(n, T))
    keys = rng.integers(0, cfg.n_keys, size=n)
    values = rng.integers(0, cfg.n_values, size=n)
    distance = rng.integers(cfg.min_distance, cfg.max_distance + 1, size=n)
    if cfg.bos:
        ids[:, 0] = BOS
    rows = np.arange(n)
    query = T - 3  # <query> k at T-3, T-2; the answer v at T-1 is predicted from position T-2
    v_pos = T - 2 - distance
    ids[rows, v_pos - 2], ids[rows, v_pos - 1], ids[rows, v_pos] = KV, key0 + keys, value0 + values
    ids[:, query], ids[:, query + 1], ids[:, T - 1] = QUERY, key0 + keys, value0 + values
    labels = np.full((n, T), IGNORE)
    labels[:, T - 1] = value0 + values
    return {"id": [f"{split}-{i}" for i in range(n)], "input_ids": ids.tolist(), "labels": labels.tolist(),
            "answer": (value0 + values).tolist(), "distance": distance.tolist()}
