"""ReST-EM's E-step filter (Singh et al. 2023, "Beyond Human Data").

The M-step maximises E[r * log p(y|x)] with a binary verifier reward r, i.e. plain NLL on the
samples with r = 1. So the E-step keeps exactly the verified samples, de-duplicated per problem and
capped at `max_per_problem` (paper: 10) so that easy problems do not dominate the fine-tuning set.
"""

from __future__ import annotations

from collections.abc import Sequence


def select_verified(problem: Sequence[int], completions: Sequence[tuple[int, ...]], correct: Sequence[bool],
                    finished: Sequence[bool], max_per_problem: int) -> list[int]:
    """Indices of the samples to fine-tune on.

    A sample is kept when it is verified correct and ended with eos (a truncated one would teach the
    model to stop mid-solution), unless the same problem already kept an identical completion or
    `max_per_problem` of them. Samples are taken in order, so the cap keeps the earliest ones: the
    samples are i.i.d. draws, so this is an unbiased, deterministic choice.
    """
    kept: list[int] = []
    seen: dict[int, set[tuple[int, ...]]] = {}
    for i, (p, ids, ok, done) in enumerate(zip(problem, completions, correct, finished)):
        mine = seen.setdefault(p, set())
        if ok and done and ids not in mine and len(mine) < max_per_problem:
            mine.add(ids)
            kept.append(i)
    return kept
