"""Synthetic multi-step arithmetic: the default, self-contained post-training task.

A problem is ``n_operands`` integers in ``[0, max_operand]`` joined by operators and
evaluated strictly left to right (no precedence; the worked steps make the order
explicit). The completion shows one step per operation and ends with ``#<answer>``:

    prompt      2+9-1-4=
    completion  2+9=11;11-1=10;10-4=6;#6
    answer      6
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `datasets` loads only when splits are built: recipes import ArithmeticConfig cheaply
    import datasets

ALLOWED_OPS = "+-*"
SPLITS = ("test", "sft", "pool")  # draw order: test first so it depends only on n_test

_INT_RE = re.compile(r"[+-]?[0-9]+")  # not int(): it also accepts '1_0' and non-ASCII digits
_ANSWER_END_RE = re.compile(r"[\s;<]")  # '<' starts a special token such as '</s>'


@dataclass
class ArithmeticConfig:
    """Problem space and split sizes; everything is deterministic given ``seed``."""

    n_operands: int = 4
    max_operand: int = 9
    ops: str = "+-"
    n_sft: int = 500  # worked demonstrations for SFT
    n_pool: int = 5000  # problems for self-training / RL (only the answer is needed)
    n_test: int = 1000  # held out
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_operands < 2:
            raise ValueError(f"n_operands must be >= 2, got {self.n_operands}")
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not self.ops or not set(self.ops) <= set(ALLOWED_OPS) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops must be a non-empty string of distinct characters from {ALLOWED_OPS!r}, got {self.ops!r}")
        for name in ("n_sft", "n_pool", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_total > self.n_possible:
            raise ValueError(
                f"requested {self.n_total} distinct problems (n_sft + n_pool + n_test) but only "
                f"{self.n_possible} exist for n_operands={self.n_operands}, max_operand={self.max_operand}, ops={self.ops!r}"
            )

    @property
    def n_total(self) -> int:
        return self.n_sft + self.n_pool + self.n_test

    @property
    def n_possible(self) -> int:
        """Number of distinct prompts: operand choices times operator choices."""
        return (self.max_operand + 1) ** self.n_operands * len(self.ops) ** (self.n_operands - 1)


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}")


def _check_arity(operands: Sequence[int], ops: Sequence[str]) -> None:
    if len(operands) < 2 or len(ops) != len(operands) - 1:
        raise ValueError(f"need >= 2 operands and one operator fewer, got {len(operands)} and {len(ops)}")


def solve(operands: Sequence[int], ops: Sequence[str]) -> tuple[str, int]:
    """Evaluate left to right; return the worked steps (``'a+b=c;c-d=e;'``) and the answer."""
    _check_arity(operands, ops)
    acc, steps = operands[0], []
    for op, b in zip(ops, operands[1:]):
        new = _apply(acc, op, b)
        steps.append(f"{acc}{op}{b}={new};")
        acc = new
    return "".join(steps), acc


def format_prompt(operands: Sequence[int], ops: Sequence[str]) -> str:
    """``[2, 9, 1], ['+', '-'] -> '2+9-1='``."""
    _check_arity(operands, ops)
    return "".join(f"{a}{op}" for a, op in zip(operands, ops)) + f"{operands[-1]}="


def format_solution(operands: Sequence[int], ops: Sequence[str]) -> str:
    """Worked completion: steps followed by ``#<answer>``."""
    steps, answer = solve(operands, ops)
    return f"{steps}#{answer}"


def _draw_problem(rng: random.Random, cfg: ArithmeticConfig) -> tuple[list[int], list[str]]:
    operands = [rng.randint(0, cfg.max_operand) for _ in range(cfg.n_operands)]
    ops = [rng.choice(cfg.ops) for _ in range(cfg.n_operands - 1)]
    return operands, ops


def _record(split: str, index: int, prompt: str, operands: list[int], ops: list[str]) -> dict[str, str]:
    steps, answer = solve(operands, ops)
    return {"id": f"arith-{split}-{index:06d}", "prompt": prompt, "completion": f"{steps}#{answer}", "answer": str(answer)}


def build_splits(cfg: ArithmeticConfig | None = None) -> datasets.DatasetDict:
    """Splits ``sft``, ``pool`` and ``test`` of distinct problems; no prompt appears twice anywhere.

    Problems are drawn one at a time from ``random.Random(cfg.seed)`` and rejected if seen, so
    a split's contents depend only on the seed and the sizes of the splits drawn before it
    (test, then sft, then pool): growing the pool never changes the held-out test set.
    """
    cfg = cfg or ArithmeticConfig()
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    sizes = {"test": cfg.n_test, "sft": cfg.n_sft, "pool": cfg.n_pool}
    rows: dict[str, list[dict[str, str]]] = {}
    for split in SPLITS:
        rows[split] = []
        while len(rows[split]) < sizes[split]:  # terminates: __post_init__ checked n_total <= n_possible
            operands, ops = _draw_problem(rng, cfg)
            prompt = format_prompt(operands, ops)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows[split].append(_record(split, len(rows[split]), prompt, operands, ops))
    import datasets

    features = datasets.Features({k: datasets.Value("string") for k in ("id", "prompt", "completion", "answer")})
    return datasets.DatasetDict({split: _to_dataset(rows[split], features) for split in ("sft", "pool", "test")})


def _to_dataset(rows: list[dict[str, str]], features: datasets.Features) -> datasets.Dataset:
    # Column-wise: from_list cannot build an empty split with an explicit schema.
    import datasets

    return datasets.Dataset.from_dict({col: [r[col] for r in rows] for col in features}, features=features)


def extract_answer(text: str) -> str | None:
    """Text after the last ``#`` up to whitespace, ``;`` or ``<`` (e.g. a trailing ``</s>``); None if absent/empty."""
    _, sep, tail = text.rpartition("#")
    if not sep:
        return None
    answer = _ANSWER_END_RE.split(tail.lstrip(), maxsplit=1)[0].strip()
    return answer or None


def _parse_int(text: str | None) -> int | None:
    if text is None or not _INT_RE.fullmatch(text.strip()):
        return None
    return int(text)


def is_correct(completion: str, answer: str) -> bool:
    """Integer comparison of the extracted answer (so ``+6`` and ``06`` match ``6``); never raises."""
    predicted, expected = _parse_int(extract_answer(completion)), _parse_int(answer)
    return predicted is not None and predicted == expected
