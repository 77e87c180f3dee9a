"""Verifiers: (completion, reference answer) -> verdict. Pure Python; they run inside VerifierWorkers.

A verifier is a module exposing
  extract(completion: str) -> str | None      the final answer, normalised (None: no answer)
  equal(a: str, b: str) -> bool               answer equivalence, used for scoring and majority voting
"""

from __future__ import annotations

import importlib
from types import ModuleType

VERIFIERS = {"arithmetic": "posttrain.verifiers.arithmetic", "arithmetic_steps": "posttrain.verifiers.arithmetic_steps", "math": "posttrain.verifiers.math",
             "code": "posttrain.verifiers.code"}
VERIFIER_DESCRIPTIONS = {
    "arithmetic": "integer final answer after the last '#' (the synthetic arithmetic task)",
    "arithmetic_steps": "the arithmetic answer, and every worked step 'a+b=c' valid and chained (no lucky answers)",
    "math": "last \\boxed{}, '#### n' or 'the answer is ...', compared with math-verify (GSM8K, MATH)",
    "code": "the program run against its tests in the isolated sandbox (HumanEval, MBPP, stdio, the functions task)",
}


def get_verifier(name: str) -> ModuleType:
    return importlib.import_module(VERIFIERS[name])


def answer_equal(name: str):
    """Answer equivalence for the driver's voting and re-ranking: the verifier's hang-safe form when it has one."""
    module = get_verifier(name)
    return getattr(module, "safe_equal", module.equal)


def votes(name: str) -> bool:
    """Whether answers can be voted on (maj@k, re-ranking): not for programs, which only tests can judge."""
    return name != "code"
