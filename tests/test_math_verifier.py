"""The `math` verifier: extraction, math-verify equivalence, the process-pool time limit, and an audit
of real GSM8K / MATH-500 answers (skipped when the shared data folder is absent)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from posttrain.verifiers import get_verifier
from posttrain.verifiers.math import MathChecker, check, equal, extract, reference_answer, score_many, verify_cli
from posttrain.workers.verifier import VerifierWorker

SHARED = Path(os.environ.get("POSTTRAIN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HANG = r"9^{9^{9^{9}}}"  # sympy evaluates the power tower eagerly: CPU-bound for hours, little memory


@pytest.fixture(scope="module")
def checker():
    with MathChecker(workers=2) as c:
        yield c


def _jsonl(name: str) -> list[dict]:
    path = SHARED / name / "test.jsonl"
    if not path.exists():
        pytest.skip(f"real data not found: {path} (set POSTTRAIN_TEST_DATA to the shared data folder)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "completion, answer",
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),  # nested braces
        (r"first \boxed{1}, on reflection \boxed{2}", "2"),  # the last box wins
        (r"\fbox{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not unbalance
        (r"\boxed{\boxed{7}}", r"\boxed{7}"),  # outermost box, raw: equal() unwraps
        (r"\boxed{3} and then \boxed{4", "3"),  # a truncated last box is ignored
        (r"\boxed{} The answer is 5.", "5"),  # an empty box is no answer
        ("Natalia sold 48 + 24 = 72 clips.\n#### 1,234", "1,234"),
        ("#### 5\nno, wait\n#### 6", "6"),
        ("The answer is 42.", "42"),
        ("So the answer is 3.5. Done", "3.5"),  # a decimal point does not end the sentence
        ("the final answer is: **17**", "17"),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", r"$\frac{3}{4}$"),
        (r"The answer is 4. Checking: \boxed{5}", "5"),  # boxed outranks "the answer is"
        ("I am not sure.", None),
        ("", None),
    ],
)
def test_extract(completion: str, answer: str | None) -> None:
    assert extract(completion) == answer


def test_reference_answer_takes_bare_answers_and_full_solutions() -> None:
    assert reference_answer("42") == "42"
    assert reference_answer("3 + 4 = 7\n#### 7") == "7"
    assert reference_answer(r"Hence $\boxed{\dfrac{14}{3}}$.") == r"\dfrac{14}{3}"
    assert reference_answer("  ") is None


# ---------------------------------------------------------------- equivalence

EQUAL = [
    (r"\frac{1}{2}", "0.5"),
    ("0.5", r"\frac12"),
    ("1,000", "1000"),
    ("1000", "1,000"),
    ("3.0", "3"),
    ("$5", "5"),
    (r"\$5", "5"),
    (r"\boxed{7}", "7"),
    ("1/2", r"\dfrac{1}{2}"),
    (r"\$1,234.50", "1234.5"),
    (r"5\text{ cm}", "5"),
    (r"\{2, 1\}", r"\{1, 2\}"),  # sets are unordered
    (r"3\frac{1}{2}", "3.5"),
    (r"\text{(A)}", "A"),
    (r"\frac{x}{2}", "0.5x"),
    (r"\sqrt{2}", "1.41421356"),  # math-verify rounds floats to 6 places
    (r"x \in [0, 1]", "[0,1]"),
]

# Equal under math-verify by design; kept explicit so a change upstream is noticed.
LENIENT = [
    (r"10\%", "10"),  # a percentage equals its number and its fraction: both readings are accepted
    (r"10\%", "0.1"),
    ("x=3", "3"),  # an assignment equals its value
    ("3", "x=3"),
    (r"\{1,2\}", "(1,2)"),  # "(1,2)" is read as an interval, a point, or the list 1,2
]

UNEQUAL = [
    ("4", r"4\sqrt2"),
    (r"4\sqrt{2}", "4"),
    ("[0,9)", "(0,9)"),
    ("(0,9]", "[0,9]"),
    ("(-\\infty,0)", "(-\\infty,0]"),
    ("2", r"\frac{1+\sqrt5}{2}"),
    ("", "5"),
    ("5", ""),
    ("   ", "0"),
    ("1/2", "2"),
    ("2", r"\frac12"),
    (r"\frac{1}{2}", r"\frac{2}{1}"),
    ("x+1", "x-1"),
    (r"\pi", "3.14"),
    ("3.14", r"\pi"),
    ("e", "2.718"),
    (r"\sqrt{2}", "1.414"),
    ("0.333", r"\frac13"),
    (r"10\%", "1"),
    ("(1,2)", "(2,1)"),  # tuples are ordered
    (r"\{1,2\}", r"\{1,2,3\}"),
    (r"\{1,2,3\}", r"\{1,2\}"),
    ("(2,3)", "(2,3,4)"),
    ("[1,2]", r"\{1,2\}"),
    ("-1", "1"),
    (r"\infty", r"-\infty"),
    ("i", "-i"),
    ("1+i", "1-i"),
    ("x^2", "x^3"),
    (r"\sin x", r"\cos x"),
    ("y=3", "x=3"),
    ("x>3", "x<3"),
    (r"x\ge 3", "x>3"),
    ("1000", "1,001"),
    ("1,234", "1.234"),  # a comma is a thousands separator, not a decimal point
    ("2,3", "23"),
    ("12345678", "12345679"),
    ("1000000", "1000001"),
    ("0.5", "0.05"),
    ("2^{10}", "1000"),
    ("A", "B"),
    (r"\text{(A)}", r"\text{(B)}"),
    (r"\text{Evelyn}", r"\text{Bob}"),
    (r"\$5", r"\$50"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}"),
]


@pytest.mark.parametrize("a, b", EQUAL + LENIENT)
def test_equal(a: str, b: str) -> None:
    assert equal(a, b)


def test_no_false_accepts() -> None:
    assert len(UNEQUAL) >= 30
    false_accepts = [(a, b) for a, b in UNEQUAL if equal(a, b)]
    print(f"\nfalse accepts: {len(false_accepts)} of {len(UNEQUAL)} unequal pairs {false_accepts}")
    assert false_accepts == []


def test_full_solutions_as_references() -> None:
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert equal("72", gsm8k) and equal(r"\boxed{72.0}", gsm8k)
    assert not equal("71", gsm8k)
    assert equal("0.75", r"Thus the probability is $\boxed{\frac34}$.")


def test_registered_and_used_by_the_verifier_worker() -> None:
    assert get_verifier("math").equal("0.5", r"\frac12")
    verdicts = VerifierWorker("math").score([r"so \boxed{1,000}", "no idea", r"\boxed{3}"], ["1000", "7", "4"])
    assert [(v.correct, v.answer) for v in verdicts] == [(True, "1,000"), (False, None), (False, "3")]


# ---------------------------------------------------------------- process pool, time limit


def test_check_and_cli(capfd: pytest.CaptureFixture[str]) -> None:
    got = check(r"... so $\boxed{\frac{1}{2}}$", "Half of it.\n#### 0.5")
    assert got == {"correct": True, "prediction": r"\frac{1}{2}", "reference": "0.5", "error": None}
    assert check("no answer here", "5") == {"correct": False, "prediction": None, "reference": "5", "error": None}
    assert verify_cli("1/2", "0.5") == {"correct": True, "prediction": "1/2", "reference": "0.5", "error": None}
    assert json.dumps(verify_cli("The answer is 7.", r"\boxed{8}")) == (
        '{"correct": false, "prediction": "7", "reference": "8", "error": null}'
    )
    assert capfd.readouterr().out == ""  # the CLI prints the JSON itself


def test_score_many_is_the_workers_score_with_a_time_limit() -> None:
    completions = [r"\boxed{72}", rf"\boxed{{{HANG}}}", "no answer"]
    verdicts = score_many(completions, ["So 72\n#### 72", "1", None], timeout_s=1.0)
    assert [(v.correct, v.answer, v.error) for v in verdicts] == [
        (True, "72", None),
        (False, HANG, "timeout"),
        (False, None, None),
    ]


def test_hung_check_times_out_and_the_pool_recovers(checker: MathChecker) -> None:
    pairs = [(rf"\boxed{{{HANG}}}", "1"), (r"\boxed{0.5}", r"\frac12"), ("#### 3", "4")]
    runs = []
    for _ in range(2):  # the same verdicts each time: deterministic, and the replaced worker serves
        start = time.monotonic()
        verdicts = checker.check_many(pairs, timeout_s=1.0)
        elapsed = time.monotonic() - start
        runs.append([(v.correct, v.answer, v.error) for v in verdicts])
        assert elapsed < 1.0 + 2.0, elapsed
    assert runs[0] == runs[1] == [(False, HANG, "timeout"), (True, "0.5", None), (False, "3", None)]


def test_hung_worker_is_killed(checker: MathChecker) -> None:
    before = {w.proc.pid for w in checker._workers}
    assert checker.equal_many([(HANG, "1")], timeout_s=0.5) == [(False, "timeout")]
    gone = before - {w.proc.pid for w in checker._workers}
    assert len(gone) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(gone.pop(), 0)
    assert checker.equal_many([("2", "2")]) == [(True, None)]


def test_dead_idle_worker_is_replaced(checker: MathChecker) -> None:
    checker.equal_many([("1", "1")])
    victim = next(w for w in checker._workers if w.ready).proc
    victim.kill()
    victim.wait()
    assert checker.equal_many([(str(i), str(i)) for i in range(6)]) == [(True, None)] * 6


def test_worker_dying_at_start_is_dropped_not_fatal() -> None:
    with MathChecker(workers=2) as fresh:
        fresh.equal_many([])  # starts the workers without waiting for them
        fresh._workers[0].proc.kill()  # long before its ~0.5 s start-up is done
        assert fresh.equal_many([(str(i), str(i)) for i in range(4)]) == [(True, None)] * 4


def test_check_works_from_threads(checker: MathChecker) -> None:
    # math-verify's own SIGALRM limit would raise off the main thread; ours does not care.
    results: list[list[tuple[bool, str | None]]] = []
    threads = [
        threading.Thread(target=lambda: results.append(checker.equal_many([(HANG, "1"), ("1,000", "1000")], 0.5)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [[(False, "timeout"), (True, None)]] * 2


# ---------------------------------------------------------------- audit on real data

# math-verify has known gaps in general, but none shows on these answers: every false reject is a bug.
MAX_FALSE_REJECTS = 0


def _gsm8k_variants(number: str) -> list[str]:
    value = int(number.replace(",", ""))
    return [number, f"{value:,}", f"{value}.0", f"${number}", rf"\${number}", rf"\boxed{{{number}}}"]


def _decimal(answer: str) -> str | None:
    """The exact decimal of a whole-answer fraction \\frac{a}{b} whose denominator divides a power of 10."""
    m = re.fullmatch(r"(-?)\\[dt]?frac(?:\{(\d+)\}|(\d))(?:\{(\d+)\}|(\d))", answer.strip())
    if not m:
        return None
    sign, numerator, denominator = m.group(1), m.group(2) or m.group(3), int(m.group(4) or m.group(5))
    rest = denominator
    for p in (2, 5):
        while rest and rest % p == 0:
            rest //= p
    if rest != 1:
        return None
    text = sign + format(Decimal(numerator) / Decimal(denominator), "f")  # exact: the expansion terminates
    assert Fraction(text) == Fraction(f"{sign}{numerator}/{denominator}")
    return text


def _audit(checker: MathChecker, items: list[tuple[str, str, str]], label: str) -> list[tuple[str, str, str]]:
    """Check (kind, prediction, gold) items through the pool; the false rejects."""
    results = checker.equal_many([(p, g) for _, p, g in items], timeout_s=5.0)
    rejects = [item for item, (ok, _) in zip(items, results) if not ok]
    print(f"\n{label}: {len(items)} checks, {len(rejects)} false rejects")
    for kind, pred, gold in rejects:
        print(f"  [{kind}] {pred!r} vs gold {gold!r}")
    return rejects


def test_audit_gsm8k(checker: MathChecker) -> None:
    rows = _jsonl("gsm8k")
    items = []
    for row in rows:
        number = row["answer"].split("####")[-1].strip()
        assert extract(row["answer"]) == number
        items += [("variant", v, number) for v in _gsm8k_variants(number)]
    assert len(_audit(checker, items, f"GSM8K ({len(rows)} answers)")) <= MAX_FALSE_REJECTS


def test_audit_math500(checker: MathChecker) -> None:
    rows = _jsonl("math500")
    items = []
    for row in rows:
        answer = row["answer"]
        items += [("self", answer, answer), ("boxed", rf"\boxed{{{answer}}}", answer)]
        items.append(("solution", extract(row["solution"]) or "", answer))  # the solution's own box
        if (decimal := _decimal(answer)) is not None:
            items.append(("decimal", decimal, answer))
    decimals = sum(kind == "decimal" for kind, _, _ in items)
    assert decimals > 0
    assert len(_audit(checker, items, f"MATH-500 ({len(rows)} answers, {decimals} decimal)")) <= MAX_FALSE_REJECTS


def test_throughput_gsm8k(checker: MathChecker) -> None:
    rows = _jsonl("gsm8k")
    pairs = [(row["answer"], row["answer"]) for row in rows]  # full solutions: extraction included
    start = time.perf_counter()
    verdicts = checker.check_many(pairs, timeout_s=5.0)
    elapsed = time.perf_counter() - start
    rate = len(pairs) / elapsed
    print(f"\nthroughput: {len(pairs)} GSM8K answers in {elapsed:.2f} s = {rate:.0f} checks/s (2 workers)")
    assert all(v.correct for v in verdicts)
    assert rate > 20  # a floor for a loaded CI box; typically 1,400-2,800/s on 2 cores
