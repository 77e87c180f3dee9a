"""Verifier for the arithmetic task that also checks the work: every step `a±b=c` must be valid arithmetic and
start from the previous step's result, and the final answer must follow the last step.

An answer-only check accepts solutions whose errors cancel (`7-9=-1;-1+6=4;4+2=6;#6`): about 30% of the
"correct" samples of a weak tiny model. Self-training on those teaches the errors; this verifier rejects them.
"""

from __future__ import annotations

import re

from posttrain.verifiers.arithmetic import equal  # noqa: F401  (same answer equivalence: integers)
from posttrain.verifiers.arithmetic import extract as extract_answer

_STEP = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")


def steps_valid(completion: str) -> bool:
    """Every `a op b = c` step holds and chains from the previous result; the answer repeats the last result."""
    body, sep, _ = completion.rpartition("#")
    if not sep:
        return False
    steps = [s for s in body.split(";") if s.strip()]
    if not steps:
        return False
    previous = None
    for step in steps:
        m = _STEP.match(step.strip())
        if not m:
            return False
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if (previous is not None and a != previous) or c != {"+": a + b, "-": a - b, "*": a * b}[op]:
            return False
        previous = c
    return extract_answer(completion) == str(previous)


def extract(completion: str) -> str | None:
    """The final answer, or None when the work does not check out (so it neither scores nor votes)."""
    return extract_answer(completion) if steps_valid(completion) else None
