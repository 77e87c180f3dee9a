"""VerifierWorker: scores completions against reference answers with a named verifier."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Verdict:
    correct: bool
    answer: str | None  # the extracted, normalised final answer
    error: str | None = None  # a verifier failure (counted as incorrect, never fatal)


class VerifierWorker:
    def __init__(self, verifier: str, workers: int = 1):
        from posttrain.verifiers import get_verifier

        self.name = verifier
        self.verifier = get_verifier(verifier)
        if hasattr(self.verifier, "configure"):  # a pool of checking processes (the code sandbox)
            self.verifier.configure(workers=workers)

    def score(self, completions: list[str], references: list[str | None]) -> list[Verdict]:
        # Verifiers that can hang (math: sympy) check in their own processes with an outside timeout.
        if hasattr(self.verifier, "score_many"):
            return self.verifier.score_many(completions, references)
        return [self._one(c, r) for c, r in zip(completions, references)]

    def _one(self, completion: str, reference: str | None) -> Verdict:
        try:
            answer = self.verifier.extract(completion)
            ok = answer is not None and reference is not None and self.verifier.equal(answer, reference)
            return Verdict(bool(ok), answer)
        except Exception as exc:  # a verifier bug on one sample must not stop the run
            return Verdict(False, None, f"{type(exc).__name__}: {exc}"[:300])

    def equal(self, a: str, b: str) -> bool:
        return self.verifier.equal(a, b)
