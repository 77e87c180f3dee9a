"""Evaluation maths: pass@k and majority-vote accuracy (pure functions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["pass_at_k", "mean_pass_at_k", "majority_answer", "maj_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021, "Evaluating LLMs Trained on Code").

    Given ``n`` samples of which ``c`` are correct, returns the probability that a
    uniformly random subset of ``k`` samples contains at least one correct one:
    ``1 - C(n - c, k) / C(n, k)``. The binomial ratio is evaluated as the product
    ``prod_{i=n-c+1}^{n} (1 - k / i)`` so that large ``n`` does not overflow.

    Raises:
        ValueError: if ``k < 1``, ``k > n``, ``c < 0`` or ``c > n``.
    """
    if k < 1 or k > n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
    if c < 0 or c > n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if n - c < k:
        # Every k-subset must contain a correct sample.
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Average :func:`pass_at_k` over problems; ``correct[p][s]`` marks sample ``s`` of problem ``p``.

    Raises:
        ValueError: if there are no problems, or a problem has fewer than ``k`` samples.
    """
    if not correct:
        raise ValueError("mean_pass_at_k needs at least one problem")
    scores = [pass_at_k(len(samples), sum(bool(x) for x in samples), k) for samples in correct]
    return float(np.mean(scores))


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """Most frequent non-``None`` answer, or ``None`` if every answer is ``None``.

    Ties are broken deterministically in favour of the answer whose *first
    occurrence* comes earliest in ``answers`` (i.e. sample order), so the result
    never depends on hash or dict iteration order.
    """
    counts: dict[str, int] = {}  # dicts keep insertion order == first-occurrence order
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    best: str | None = None
    best_count = 0
    for answer, count in counts.items():
        if count > best_count:  # strict '>' keeps the earliest answer on ties
            best, best_count = answer, count
    return best


def _string_equal(a: str, b: str) -> bool:
    return a == b


def maj_at_k(
    answers: Sequence[Sequence[str | None]],
    references: Sequence[str],
    k: int,
    equal: Callable[[str, str], bool] = _string_equal,
) -> float:
    """Fraction of problems whose majority vote over the first ``k`` samples matches the reference.

    ``answers[p]`` holds the already-normalised extracted answers of problem ``p``
    (``None`` where no answer could be extracted); ``equal(voted, reference)``
    decides correctness, so callers can plug in numeric comparison. A problem
    whose first ``k`` samples are all ``None`` counts as wrong.

    Raises:
        ValueError: if ``k < 1``, lengths mismatch, there are no problems, or a
            problem has fewer than ``k`` samples.
    """
    if k < 1:
        raise ValueError(f"maj@k needs k >= 1, got {k}")
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answer lists but {len(references)} references")
    if not answers:
        raise ValueError("maj_at_k needs at least one problem")
    hits = 0
    for samples, reference in zip(answers, references):
        if len(samples) < k:
            raise ValueError(f"maj@{k} needs >= {k} samples per problem, got {len(samples)}")
        voted = majority_answer(samples[:k])
        hits += voted is not None and equal(voted, reference)
    return hits / len(answers)
