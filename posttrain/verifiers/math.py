"""Verifier for math answers (GSM8K, MATH): final-answer extraction plus math-verify equivalence.

math-verify's own time limit uses SIGALRM, which only works on a process's main thread (not in Ray
actor threads or thread pools), so it is switched off here. `MathChecker` enforces a hard limit from
outside instead: checks run in worker processes, and a worker that overruns is killed and replaced.
`equal` itself runs in-process with no time limit; use `MathChecker` wherever input is untrusted.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from posttrain.workers.verifier import Verdict

# ---------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*(.+)")
# "The answer is X." / "the final answer is: X" up to the end of the sentence or line; a period
# only ends the sentence when followed by whitespace, so "3.5" stays whole.
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+?)(?:\.(?=\s)|\.?$)", re.IGNORECASE | re.MULTILINE)


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the brace closing the group opened just before `start`; escaped braces don't count."""
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character: \{ and \} are literal, \\ is a line break
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _last_boxed(text: str) -> str | None:
    """Contents of the last complete top-level \\boxed{...} / \\fbox{...}."""
    found, pos = None, 0
    while (m := _BOXED.search(text, pos)) is not None:
        end = _closing_brace(text, m.end())
        if end is None:  # truncated box: a complete one may still sit inside it
            pos = m.end()
            continue
        found, pos = text[m.end() : end], end + 1
    return found


def _clean(answer: str) -> str:
    return answer.strip().rstrip(".").strip().strip("*").strip()


def _last_group(pattern: re.Pattern[str], text: str) -> str | None:
    last = None
    for last in pattern.finditer(text):
        pass
    return last.group(1) if last is not None else None


def extract(completion: str) -> str | None:
    """The raw final answer of a completion: last \\boxed{}, else `#### n`, else "the answer is ...".

    Normalisation for comparison (thousands commas, $, units, ...) is left to `equal`.
    """
    for raw in (_last_boxed(completion), _last_group(_HASHES, completion), _last_group(_ANSWER_IS, completion)):
        if raw is not None and (answer := _clean(raw)):
            return answer
    return None


def reference_answer(reference: str) -> str | None:
    """The answer a reference stands for: a full solution's final answer, else the reference itself."""
    return extract(reference) or _clean(reference) or None


# ---------------------------------------------------------------- equivalence

# Boxing the whole answer makes math-verify's LaTeX extractor take all of it, instead of hunting for
# an anchor ("final answer is") and possibly a fragment. Plain-text maths the LaTeX parser cannot
# turn into sympy (rare) gets a second chance with the expression parser.
_LATEX = (LatexExtractionConfig(boxed_match_priority=0),)
_EXPR = (ExprExtractionConfig(),)
_DOLLAR = re.compile(r"(?<!\\)\$")  # unescaped $: maths delimiters or a currency sign; \$ is left to math-verify


def _parse(answer: str) -> list[Any]:
    text = _DOLLAR.sub("", answer).strip()
    parsed = parse("\\boxed{" + text + "}", _LATEX, parsing_timeout=None)  # type: ignore[arg-type]
    if all(isinstance(p, str) for p in parsed):
        parsed = parse(text, _EXPR, parsing_timeout=None) or parsed  # type: ignore[arg-type]
    return parsed


def equal(a: str, b: str) -> bool:
    """math-verify equivalence of two answers, `b` taken as the gold one.

    Either side may also be a full solution (a GSM8K `answer` field): its final answer is used.
    math-verify is asymmetric only in corner cases (an equation `x=3` as gold accepts `3`, and
    vice versa). Percentages follow math-verify: `10\\%` equals both `10` and `0.1`. Empty answers
    equal nothing. No time limit here: see `MathChecker`.
    """
    pred, gold = reference_answer(a or ""), reference_answer(b or "")
    if not pred or not gold:
        return False
    parsed_gold, parsed_pred = _parse(gold), _parse(pred)
    return bool(parsed_gold and parsed_pred and verify(parsed_gold, parsed_pred, timeout_seconds=None))


# ---------------------------------------------------------------- hard time limit: worker processes


def _serve(fd: int, memory_mb: int) -> None:
    """Worker process loop on socket `fd`: receive (a, b, cpu_limit_s), answer (correct, error)."""
    conn = Connection(fd)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning: we enforce one
    if memory_mb > 0:  # a runaway sympy expansion gets a MemoryError instead of eating the host's RAM
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    equal("1", "1")  # warm up the parsers before reporting ready, so no check is billed for it
    conn.send("ready")
    while True:
        try:
            a, b, cpu_limit_s = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        # Backstop if the parent dies mid-check: the kernel stops a check that outspends its CPU budget.
        used = resource.getrusage(resource.RUSAGE_SELF)
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        soft = math.ceil(used.ru_utime + used.ru_stime + cpu_limit_s)
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
        try:
            reply: tuple[bool, str | None] = (equal(a, b), None)
        except Exception as exc:  # any verifier failure is an incorrect verdict, never a dead worker
            reply = (False, f"{type(exc).__name__}: {exc}"[:300])
        conn.send(reply)


_WORKER_CMD = "import sys; from posttrain.verifiers.math import _serve; _serve(int(sys.argv[1]), int(sys.argv[2]))"


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    conn: Connection
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    job: int | None = None
    deadline: float = math.inf

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()


class MathChecker:
    """Runs `equal` in worker processes under a hard wall-clock limit per check.

    A check past its limit is incorrect with error "timeout"; its worker is killed and replaced, so
    later checks proceed. Works from any thread (calls are serialised); never raises on bad input.
    Workers are fresh interpreters (not multiprocessing children): forking a threaded parent (Ray,
    torch) can deadlock, and spawn/forkserver would re-import the parent's __main__ in each worker.
    """

    def __init__(self, workers: int = 2, memory_mb: int = 4096, start_timeout_s: float = 120.0):
        if workers < 1:
            raise ValueError(f"MathChecker needs at least one worker, got {workers}")
        self._n, self._memory_mb, self._start_timeout_s = workers, memory_mb, start_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the parent's imports
        with theirs:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CMD, str(theirs.fileno()), str(self._memory_mb)],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # keep the parent's stdout clean (the CLI prints JSON there)
                start_new_session=True,  # a terminal's Ctrl-C is for the parent; workers exit when it closes the socket
            )
        return _Worker(proc, Connection(ours.detach()))

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        self._workers[self._workers.index(worker)] = self._spawn()

    def equal_many(self, pairs: list[tuple[str, str]], timeout_s: float = 5.0) -> list[tuple[bool, str | None]]:
        """(correct, error) per (answer, gold answer) pair; errors and timeouts are incorrect."""
        results: list[tuple[bool, str | None]] = [(False, None)] * len(pairs)
        todo = deque(range(len(pairs)))
        with self._lock:
            try:
                self._run(pairs, timeout_s, results, todo)
            except OSError as exc:  # cannot start a process at all (fd or process limits)
                for i in [*todo, *(w.job for w in self._workers if w.job is not None)]:
                    results[i] = (False, f"worker failed to start: {exc}")
                self._stop_all()
        return results

    def _run(
        self, pairs: list[tuple[str, str]], timeout_s: float, results: list[tuple[bool, str | None]], todo: deque[int]
    ) -> None:
        while len(self._workers) < self._n:
            self._workers.append(self._spawn())
        cpu_limit_s = math.ceil(timeout_s) + 2
        while todo or any(w.job is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.job is None and todo:
                    i = todo.popleft()
                    try:
                        w.conn.send((*pairs[i], cpu_limit_s))
                    except OSError:  # died while idle: not this pair's fault, retry it elsewhere
                        todo.appendleft(i)
                        self._replace(w)
                        continue
                    w.job, w.deadline = i, time.monotonic() + timeout_s
            pending = [w.deadline if w.ready else w.started + self._start_timeout_s for w in self._workers]
            wait([w.conn for w in self._workers], timeout=max(0.0, min(pending) - time.monotonic()))
            for w in list(self._workers):
                failure = self._poll(w, results)
                if failure is None:
                    continue
                if not w.ready:  # could not start: drop it (the next call refills the pool), so a broken
                    w.stop()  # environment fails this call cleanly instead of respawning forever
                    self._workers.remove(w)
                    if not self._workers:
                        for i in todo:
                            results[i] = (False, failure)
                        todo.clear()
                    continue
                if w.job is not None:
                    results[w.job] = (False, failure)
                self._replace(w)

    def _poll(self, w: _Worker, results: list[tuple[bool, str | None]]) -> str | None:
        """Collect what `w` has to say; the failure that condemns it, if any."""
        now = time.monotonic()
        try:
            if w.conn.poll():
                msg = w.conn.recv()
                if msg == "ready":
                    w.ready = True
                elif w.job is not None:
                    results[w.job], w.job, w.deadline = msg, None, math.inf
                return None
        except (EOFError, OSError):
            return "worker died" if w.ready else "worker failed to start"
        if w.job is not None and now >= w.deadline:
            return "timeout"
        if not w.ready and now >= w.started + self._start_timeout_s:
            return "worker failed to start"
        return None

    def check_many(self, pairs: list[tuple[str, str | None]], timeout_s: float = 5.0) -> list[Verdict]:
        """Verdicts for (completion, reference) pairs; a reference may be a bare answer or a full solution."""
        answers = [(extract(c), reference_answer(r or "")) for c, r in pairs]
        todo = [(i, a, r) for i, (a, r) in enumerate(answers) if a and r]
        checked = dict(zip((i for i, _, _ in todo), self.equal_many([(a, r) for _, a, r in todo], timeout_s)))
        verdicts = []
        for i, (answer, _) in enumerate(answers):
            correct, error = checked.get(i, (False, None))  # no answer on either side: plainly incorrect
            verdicts.append(Verdict(correct, answer, error))
        return verdicts

    def close(self) -> None:
        with self._lock:
            self._stop_all()

    def _stop_all(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers.clear()

    def __enter__(self) -> MathChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: MathChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> MathChecker:
    """The process-wide checker that `check` uses, started on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathChecker()
            atexit.register(_default.close)
        return _default


def _verdict_dict(
    prediction: str | None, reference: str | None, timeout_s: float, checker: MathChecker
) -> dict[str, Any]:
    correct, error = False, None
    if prediction and reference:
        correct, error = checker.equal_many([(prediction, reference)], timeout_s)[0]
    return {"correct": correct, "prediction": prediction, "reference": reference, "error": error}


def score_many(completions: list[str], references: list[str | None], timeout_s: float = 5.0) -> list[Verdict]:
    """`VerifierWorker.score` with the hard time limit, on the process-wide checker."""
    return default_checker().check_many(list(zip(completions, references)), timeout_s)


def check(prediction: str, reference: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Score one completion against a reference; errors and timeouts are incorrect, never raised."""
    return _verdict_dict(extract(prediction), reference_answer(reference), timeout_s, default_checker())


def verify_cli(prediction: str, reference: str) -> dict[str, Any]:
    """`posttrain verify math PREDICTION REFERENCE`: both may be bare answers or full solutions."""
    with MathChecker(workers=1) as checker:
        return _verdict_dict(reference_answer(prediction), reference_answer(reference), 5.0, checker)


def safe_equal(a: str, b: str, timeout_s: float = 5.0) -> bool:
    """`equal` under the hard timeout, for comparisons made in the driver (majority voting, re-ranking):
    a pathological answer such as 9^{9^{9^{9}}} counts as unequal instead of hanging the run."""
    return default_checker().equal_many([(a, b)], timeout_s)[0][0]
