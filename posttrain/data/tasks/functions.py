"""Synthetic function-writing: the embedded code task, small enough for the tiny model to learn on a CPU.

A problem is a function of `a` and `b` described by a comment of chained steps; the model writes the
expression after `return`, and the code verifier runs it against asserts in the sandbox:

    prompt      def f(a, b):
                    # take a, add 3, multiply by b
                    return
    completion   (a + 3) * b
    tests       assert f(2, 7) == 35 ...   (values from the reference expression, evaluated here)

Operator precedence is the trap: "add 3, multiply by b" needs parentheses, and only running the code
tells a right expression from a plausible one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

OPERANDS = tuple(str(n) for n in range(1, 10)) + ("a", "b")
STEPS = {"add": "+", "subtract": "-", "multiply by": "*"}
SPLITS = ("test", "sft", "pool")  # draw order, as in the arithmetic task: the test set depends only on n_test


@dataclass
class FunctionsConfig:
    max_steps: int = 3  # steps after "take a" / "take b"
    n_tests: int = 4  # asserts per problem
    n_sft: int = 500
    n_pool: int = 2000
    n_test: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_steps <= 4:
            raise ValueError(f"max_steps must be in 1..4, got {self.max_steps}")
        if self.n_tests < 1:
            raise ValueError(f"n_tests must be >= 1, got {self.n_tests}")
        possible = 2 * sum((len(STEPS) * len(OPERANDS)) ** k for k in range(1, self.max_steps + 1))
        if self.n_sft + self.n_pool + self.n_test > possible:
            raise ValueError(f"asked for {self.n_sft + self.n_pool + self.n_test} distinct problems; only {possible} exist")


def expression(start: str, steps: list[tuple[str, str]]) -> str:
    """The reference body: left to right, with parentheses only where precedence needs them."""
    expr, loose = start, False  # loose: the expression's top operator is + or -
    for name, operand in steps:
        op = STEPS[name]
        if op == "*" and loose:
            expr, loose = f"({expr}) * {operand}", False
        else:
            expr, loose = f"{expr} {op} {operand}", loose or op != "*"
    return expr


def describe(start: str, steps: list[tuple[str, str]]) -> str:
    return ", ".join([f"take {start}"] + [f"{name} {operand}" for name, operand in steps])


def prompt_for(start: str, steps: list[tuple[str, str]]) -> str:
    return f"def f(a, b):\n    # {describe(start, steps)}\n    return"


def _tests(expr: str, rng: random.Random, n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        a, b = rng.randint(-9, 9), rng.randint(-9, 9)
        value = eval(expr, {"__builtins__": {}}, {"a": a, "b": b})  # our own reference expression
        out.append({"name": f"test {i}", "code": f"assert f({a}, {b}) == {value}"})
    return out


def build_splits(cfg: FunctionsConfig | None = None) -> datasets.DatasetDict:
    """Splits `test`, `sft` and `pool` of distinct problems; `answer` holds each problem's CodeTests JSON."""
    import datasets

    from posttrain.verifiers.code import CodeTests

    cfg = cfg or FunctionsConfig()
    rng = random.Random(cfg.seed)
    sizes = {"test": cfg.n_test, "sft": cfg.n_sft, "pool": cfg.n_pool}
    seen: set[str] = set()
    rows: dict[str, list[dict[str, str]]] = {}
    for split in SPLITS:
        rows[split] = []
        while len(rows[split]) < sizes[split]:
            start = rng.choice("ab")
            steps = [(rng.choice(list(STEPS)), rng.choice(OPERANDS)) for _ in range(rng.randint(1, cfg.max_steps))]
            prompt = prompt_for(start, steps)
            if prompt in seen:
                continue
            seen.add(prompt)
            expr = expression(start, steps)
            tests = CodeTests(entry="f", tests=_tests(expr, rng, cfg.n_tests), prefix=prompt)
            rows[split].append({"id": f"fn-{split}-{len(rows[split]):06d}", "prompt": prompt,
                                "completion": f" {expr}", "answer": tests.to_json()})
    features = datasets.Features({k: datasets.Value("string") for k in ("id", "prompt", "completion", "answer")})
    return datasets.DatasetDict({s: datasets.Dataset.from_dict({c: [r[c] for r in rows[s]] for c in features},
                                                               features=features) for s in SPLITS})
