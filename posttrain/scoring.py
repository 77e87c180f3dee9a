"""Evaluation maths: pass@k and majority-vote accuracy (pure functions)."""

from __future__ import annotations

from collections import Counter
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


def _string_equal(a: str, b: str) -> bool:
    return a == b


def cluster_answers(answers: Sequence[str | None], equal: Callable[[str, str], bool] = _string_equal) -> list[int | None]:
    """Cluster id per answer: equivalent answers share one (``None`` answers get ``None``).

    Clusters are numbered by first occurrence; an answer joins the first cluster whose
    representative (its first member) it equals, so the result depends only on sample order.
    """
    reps: list[str] = []
    ids: list[int | None] = []
    for answer in answers:
        if answer is None:
            ids.append(None)
            continue
        cid = next((c for c, rep in enumerate(reps) if answer == rep or equal(rep, answer)), None)
        if cid is None:
            reps.append(answer)
            cid = len(reps) - 1
        ids.append(cid)
    return ids


def majority_answer(answers: Sequence[str | None], equal: Callable[[str, str], bool] = _string_equal) -> str | None:
    """The answer of the largest cluster of equivalent answers, or ``None`` if every answer is ``None``.

    Ties are broken deterministically in favour of the cluster whose *first occurrence* comes
    earliest in ``answers`` (sample order); the first member represents the cluster.
    """
    ids = cluster_answers(answers, equal)
    sizes = Counter(c for c in ids if c is not None)
    if not sizes:
        return None
    best = min(sizes, key=lambda c: (-sizes[c], c))
    return answers[ids.index(best)]


def rerank_answer(answers: Sequence[str | None], scores: Sequence[float], top_clusters: int,
                  equal: Callable[[str, str], bool] = _string_equal) -> str | None:
    """Solution-cluster re-ranking (Liu et al. 2023): cluster samples by equivalent final answer,
    keep the `top_clusters` largest clusters (ties: earlier first occurrence), and return the answer
    of the best-scored sample among them. Score ties go to the larger cluster, then the earlier sample.

    top_clusters=1 is majority voting; top_clusters >= the number of clusters is plain re-ranking.
    """
    ids = cluster_answers(answers, equal)
    sizes = Counter(c for c in ids if c is not None)
    if not sizes:
        return None
    keep = set(sorted(sizes, key=lambda c: (-sizes[c], c))[:top_clusters])
    candidates = [i for i, c in enumerate(ids) if c in keep]
    best = min(candidates, key=lambda i: (-scores[i], -sizes[ids[i]], i))
    return answers[best]


def rerank_at_k(answers: Sequence[Sequence[str | None]], scores: Sequence[Sequence[float]], references: Sequence[str],
                top_clusters: int, equal: Callable[[str, str], bool] = _string_equal) -> float:
    """Fraction of problems whose re-ranked answer (see `rerank_answer`) equals the reference."""
    hits = 0
    for a, s, ref in zip(answers, scores, references):
        voted = rerank_answer(a, s, top_clusters, equal)
        hits += voted is not None and equal(voted, ref)
    return hits / len(references)


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
        voted = majority_answer(samples[:k], equal)
        hits += voted is not None and equal(voted, reference)
    return hits / len(answers)
