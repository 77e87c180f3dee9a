"""Verifier for the synthetic arithmetic task: the integer after the last '#'."""

from __future__ import annotations

from posttrain.data.tasks.arithmetic import extract_answer


def extract(completion: str) -> str | None:
    raw = extract_answer(completion)
    try:
        return str(int(raw)) if raw is not None else None
    except ValueError:
        return None


def equal(a: str, b: str) -> bool:
    try:
        return int(a) == int(b)
    except ValueError:
        return False
