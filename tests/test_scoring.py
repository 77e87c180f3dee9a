"""Tests for posttrain.scoring against hand-computed values and brute force."""

from __future__ import annotations

import itertools
import math

import pytest

from posttrain.scoring import maj_at_k, majority_answer, mean_pass_at_k, pass_at_k


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (first c correct) with >= 1 correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),
        (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 0.7
        (10, 0, 3, 0.0),
        (4, 4, 4, 1.0),
        (5, 4, 2, 1.0),  # n - c < k
    ],
)
def test_pass_at_k_hand_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_hand_value_is_point_seven() -> None:
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 1, 0), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_invalid(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_matches_brute_force() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_is_finite() -> None:
    value = pass_at_k(10_000, 37, 100)
    assert 0.0 < value < 1.0
    assert value == pytest.approx(1 - math.comb(10_000 - 37, 100) / math.comb(10_000, 100))


def test_mean_pass_at_k() -> None:
    correct = [[True, False, False, False], [False] * 4, [True] * 4]
    # pass@1 per problem: 0.25, 0, 1
    assert mean_pass_at_k(correct, 1) == pytest.approx((0.25 + 0.0 + 1.0) / 3)
    # pass@2: 1 - C(3,2)/C(4,2) = 0.5, 0, 1
    assert mean_pass_at_k(correct, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (["a", "b", "b"], "b"),
        (["a", "b"], "a"),  # tie: "a" occurs first
        (["b", "a", "a", "b"], "b"),  # tie 2-2: "b" occurs first
        ([None, "x", None, "y", "y", "x"], "x"),  # None ignored, tie -> earliest "x"
        ([None, None, "z"], "z"),
        ([None, None], None),
        ([], None),
    ],
)
def test_majority_answer(answers: list[str | None], expected: str | None) -> None:
    assert majority_answer(answers) == expected


def test_maj_at_k_hand_built() -> None:
    answers = [
        ["1", "2", "2", "1", "1"],  # first 3 -> "2"; all 5 -> "1"
        [None, None, "7", "7", "7"],  # first 3 -> "7"; all 5 -> "7"
        [None, None, None, "4", "4"],  # first 3 -> None; all 5 -> "4"
    ]
    references = ["1", "7", "4"]
    assert maj_at_k(answers, references, k=5) == pytest.approx(1.0)
    assert maj_at_k(answers, references, k=3) == pytest.approx(1 / 3)
    # k=1: "1" correct, None wrong, None wrong
    assert maj_at_k(answers, references, k=1) == pytest.approx(1 / 3)


def test_maj_at_k_custom_equal() -> None:
    answers = [["3.0", "3", "4"], ["0.50", "0.5", "1"]]
    references = ["3", "0.5"]
    assert maj_at_k(answers, references, k=3) == pytest.approx(0.0)  # "3.0" and "0.50" win ties
    numeric = lambda a, b: float(a) == float(b)  # noqa: E731
    assert maj_at_k(answers, references, k=3, equal=numeric) == pytest.approx(1.0)


def test_maj_at_k_invalid() -> None:
    with pytest.raises(ValueError):
        maj_at_k([["a"]], ["a", "b"], k=1)
    with pytest.raises(ValueError):
        maj_at_k([["a"]], ["a"], k=2)
    with pytest.raises(ValueError):
        maj_at_k([["a"]], ["a"], k=0)


def _num_equal(a: str, b: str) -> bool:
    from fractions import Fraction

    return Fraction(a) == Fraction(b)


def test_clusters_group_equivalent_answers_in_first_occurrence_order():
    from posttrain.scoring import cluster_answers

    assert cluster_answers(["1/2", "3", "0.5", None, "0.50", "6/2"], _num_equal) == [0, 1, 0, None, 0, 1]
    assert cluster_answers(["a", "b", "a"]) == [0, 1, 0]


def test_majority_votes_over_equivalence_classes():
    from posttrain.scoring import majority_answer

    # "3" appears twice as a string, but 1/2 == 0.5 == 0.50 is the larger class.
    assert majority_answer(["3", "1/2", "3", "0.5", "0.50"], _num_equal) == "1/2"
    assert majority_answer(["3", "1/2", "3", "0.5", "0.50"]) == "3"  # plain string equality


def test_rerank_reduces_to_majority_and_to_plain_reranking():
    from posttrain.scoring import majority_answer, rerank_answer

    answers = ["7", "8", "7", "9", "8", "7", None]
    scores = [-3.0, -0.5, -2.0, -0.1, -0.4, -9.0, 0.0]
    # one cluster kept -> the majority answer, whatever the scores
    assert rerank_answer(answers, scores, top_clusters=1) == majority_answer(answers) == "7"
    # all clusters -> the single best-scored sample with an answer (the None sample never wins)
    assert rerank_answer(answers, scores, top_clusters=10) == "9"
    # top-2 clusters ("7" size 3, "8" size 2): best score among them is "8" (-0.4)
    assert rerank_answer(answers, scores, top_clusters=2) == "8"


def test_rerank_ties_go_to_the_larger_cluster_then_the_earlier_sample():
    from posttrain.scoring import rerank_answer

    assert rerank_answer(["5", "6", "6"], [-1.0, -1.0, -2.0], top_clusters=2) == "6"  # same score: cluster of 2 wins
    assert rerank_answer(["5", "6"], [-1.0, -1.0], top_clusters=2) == "5"  # same score and size: earlier sample
    assert rerank_answer([None, None], [0.0, 0.0], top_clusters=3) is None


def test_rerank_at_k_on_hand_built_rollouts():
    from posttrain.scoring import rerank_at_k

    answers = [["1", "2", "2"], ["4", "4", "5"], [None, "9", "8"]]
    scores = [[-0.1, -1.0, -2.0], [-5.0, -6.0, -0.1], [0.0, -1.0, -0.5]]
    refs = ["1", "4", "9"]
    # all clusters: problem 1 -> "1" (best score) ok; problem 2 -> "5" wrong; problem 3 -> "8" wrong
    assert rerank_at_k(answers, scores, refs, top_clusters=3) == pytest.approx(1 / 3)
    # top-1 cluster (majority): "2" wrong, "4" ok, "9" (earliest of the size-1 tie) ok
    assert rerank_at_k(answers, scores, refs, top_clusters=1) == pytest.approx(2 / 3)
