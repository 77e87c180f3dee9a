"""Code verifier: a candidate program against its tests, in the sandbox, judged outside the candidate's control.

Three test shapes, all in `CodeTests` (which travels as a problem's reference answer, JSON-encoded):
  - HumanEval: `check(candidate)` run with the prompt's helpers as trusted context;
  - MBPP: a list of `assert` statements (plus optional set-up code run beside the program);
  - stdin/stdout: (input, expected output) pairs; outputs are compared here, never inside the sandbox.

The verdict never comes from the candidate's exit code or printed text: function tests run in a separate
checker process with its own uid (see `_jail.py`), values cross only as plain built-in data, and stdio
outputs are compared by the host.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from posttrain.verifiers.sandbox import Isolation, Limits, Sandbox
from posttrain.workers.verifier import Verdict

log = logging.getLogger(__name__)

@dataclass
class CodeTests:
    """What a program must pass. Function tests: `entry` + `tests` ({name, code}); or stdio `cases`."""

    entry: str | None = None
    tests: list[dict[str, str]] = field(default_factory=list)
    context: str = ""  # trusted code run in the checker before the tests (HumanEval's prompt: `poly`, ...)
    fixtures: str = ""  # trusted code run in the candidate after its program (MBPP's test_setup_code)
    prefix: str = ""  # program = prefix + completion (HumanEval: the prompt the model continues)
    cases: list[tuple[str, str]] = field(default_factory=list)  # stdio: (input, expected output)

    def __post_init__(self) -> None:
        if bool(self.tests) == bool(self.cases):
            raise ValueError("CodeTests needs either function tests or stdio cases (exactly one kind)")
        if self.tests and not self.entry:
            raise ValueError("function tests need the entry point's name")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CodeTests:
        raw = json.loads(text)
        raw["cases"] = [tuple(c) for c in raw.get("cases", [])]
        return cls(**raw)


@dataclass
class CodeResult:
    passed: bool
    tests: list[dict[str, str]]  # per test: name, status (passed|failed|error|timeout|memory|crashed|not_run), message
    timeout: bool = False
    memory_exceeded: bool = False
    error: str | None = None  # the first load or runtime error, truncated
    wall_s: float = 0.0
    stdout: str = ""
    stderr: str = ""

    def summary(self) -> str:
        n_pass = sum(t["status"] == "passed" for t in self.tests)
        if self.passed:
            return f"passed {n_pass}/{len(self.tests)}"
        first = next((t for t in self.tests if t["status"] != "passed"), None)
        why = self.error or (f"{first['name']}: {first['status']} {first['message']}".strip() if first else "no tests")
        return f"failed {n_pass}/{len(self.tests)}: {why}"[:300]


# ------------------------------------------------------------------------------------------ programs

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def program_for(completion: str, tests: CodeTests) -> str:
    """The program to run: a fenced code block if the completion has one (chat models), else prefix + completion."""
    fenced = _FENCE.search(completion)
    if fenced:
        return fenced.group(1)
    return tests.prefix + completion


def outputs_match(got: str, expected: str) -> bool:
    """Judge-style comparison: the same whitespace-separated tokens (trailing spaces and newlines don't count)."""
    return got.split() == expected.split()


# ------------------------------------------------------------------------------------------ checking


def check(sandbox: Sandbox, program: str, tests: CodeTests, limits: Limits = Limits()) -> CodeResult:
    """Run one program against its tests in `sandbox`."""
    if tests.cases:
        raw = sandbox.run_stdio(program, [c[0] for c in tests.cases], limits=limits)
        return _stdio_result(raw, tests)
    raw = sandbox.run_function(program, tests.entry, tests.tests, context=tests.context, fixtures=tests.fixtures,
                               limits=limits)
    return _function_result(raw, tests)


def _outside_failure(raw: dict, names: list[str]) -> CodeResult | None:
    if raw.get("wall_timeout"):
        tests = [{"name": n, "status": "timeout", "message": "wall-clock limit (killed from outside)"} for n in names]
        return CodeResult(False, tests, timeout=True, error="wall-clock limit exceeded", wall_s=raw["wall_s"])
    if "sandbox_died" in raw:
        tests = [{"name": n, "status": "crashed", "message": ""} for n in names]
        return CodeResult(False, tests, error=f"sandbox died: {raw['sandbox_died']}"[:300], wall_s=raw["wall_s"])
    return None


def _function_result(raw: dict, tests: CodeTests) -> CodeResult:
    names = [t["name"] for t in tests.tests]
    failed = _outside_failure(raw, names)
    if failed:
        return failed
    verdict, cand = raw.get("checker"), raw.get("candidate", {})
    out, err = raw["stdout"]["text"], raw["stderr"]["text"]
    if verdict is None:  # the checker itself overran or died: never a pass
        why = raw.get("checker_stderr") or f"checker {raw.get('checker_process')}"
        results = [{"name": n, "status": "error", "message": "no verdict"} for n in names]
        return CodeResult(False, results, error=f"checker gave no verdict: {why}"[-300:], wall_s=raw["wall_s"],
                          stdout=out, stderr=err)
    if not verdict["loaded"]:
        error = str(verdict.get("error"))[:300]
        status = "memory" if "MemoryError" in error else ("timeout" if "timeout" in error else "error")
        results = [{"name": n, "status": status, "message": "program did not load"} for n in names]
        return CodeResult(False, results, timeout=status == "timeout", memory_exceeded=status == "memory",
                          error=error, wall_s=raw["wall_s"], stdout=out, stderr=err)
    results = verdict["tests"]
    died = cand.get("signal")
    if died in (24, 9):  # SIGXCPU / SIGKILL: the CPU-time limit
        for t in results:
            if t["status"] == "crashed":
                t["status"], t["message"] = "timeout", "CPU-time limit"
    statuses = {t["status"] for t in results}
    first_error = next((t["message"] for t in results if t["status"] in ("error", "crashed", "memory")), None)
    passed = bool(results) and statuses == {"passed"} and len(results) == len(names)
    return CodeResult(passed, results, timeout="timeout" in statuses, memory_exceeded="memory" in statuses,
                      error=first_error, wall_s=raw["wall_s"], stdout=out, stderr=err)


def _stdio_result(raw: dict, tests: CodeTests) -> CodeResult:
    names = [f"case {i}" for i in range(len(tests.cases))]
    failed = _outside_failure(raw, names)
    if failed:
        return failed
    results, error, memory = [], None, False
    for name, (_, expected), run in zip(names, tests.cases, raw["runs"]):
        state, stdout, stderr = run["state"], run["stdout"], run["stderr"]["text"]
        if state.get("timeout") or state.get("signal") in (24, 9):
            status, message = "timeout", "time limit"
        elif "MemoryError" in stderr:
            status, message, memory = "memory", stderr.strip().splitlines()[-1][:300], True
        elif state.get("exit") != 0 or state.get("signal"):
            status, message = "error", (stderr.strip().splitlines() or [f"{state}"])[-1][:300]
        elif stdout["bytes"] > len(stdout["text"].encode()):
            status, message = "failed", "output over the size limit"
        elif outputs_match(stdout["text"], expected):
            status, message = "passed", ""
        else:
            status, message = "failed", f"expected {expected[:60]!r}, got {stdout['text'][:60]!r}"
        if status in ("error", "memory") and error is None:
            error = message
        results.append({"name": name, "status": status, "message": message})
    passed = bool(results) and all(t["status"] == "passed" for t in results)
    return CodeResult(passed, results, timeout=any(t["status"] == "timeout" for t in results),
                      memory_exceeded=memory, error=error, wall_s=raw["wall_s"],
                      stdout=raw["runs"][0]["stdout"]["text"] if raw["runs"] else "")


# ------------------------------------------------------------------------------------------ the pool


class CodePool:
    """Sandboxed checks with at most `workers` running and `queue` waiting; `submit` blocks beyond that.

    Every execution is bounded by its wall-clock limit (enforced from outside) and a jail server that dies
    is restarted, so a crashed or hung program costs its own slot for at most its limit, never the pool.
    """

    def __init__(self, workers: int | None = None, queue: int | None = None, isolation: Isolation = "auto",
                 limits: Limits = Limits()):
        self.workers = workers or len(os.sched_getaffinity(0))
        self.limits = limits
        self.sandbox = Sandbox(isolation)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="code-verifier")
        self._slots = threading.BoundedSemaphore(self.workers + (4 * self.workers if queue is None else queue))

    def submit(self, program: str, tests: CodeTests, limits: Limits | None = None) -> Future:
        self._slots.acquire()  # back-pressure: a producer faster than the sandboxes waits here
        future = self._executor.submit(self._check, program, tests, limits or self.limits)
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _check(self, program: str, tests: CodeTests, limits: Limits) -> CodeResult:
        try:
            return check(self.sandbox, program, tests, limits)
        except Exception as exc:  # the sandbox's failure, not the program's: never a pass, never a crashed pool
            log.warning("code verifier: %s", exc)
            names = [t["name"] for t in tests.tests] or [f"case {i}" for i in range(len(tests.cases))]
            return CodeResult(False, [{"name": n, "status": "error", "message": "sandbox failure"} for n in names],
                              error=f"sandbox failure: {exc}"[:300])

    def check_many(self, items: list[tuple[str, CodeTests]], limits: Limits | None = None) -> list[CodeResult]:
        futures = [self.submit(program, tests, limits) for program, tests in items]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.sandbox.close()

    def __enter__(self) -> CodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_pool: CodePool | None = None
_pool_workers: int | None = None


def configure(workers: int | None = None) -> None:
    """Size the process's pool (a VerifierWorker passes the CPUs its actor holds)."""
    global _pool_workers
    _pool_workers = workers


def default_pool() -> CodePool:
    global _pool
    if _pool is None:
        _pool = CodePool(workers=_pool_workers)
        atexit.register(_pool.close)
    return _pool


# ------------------------------------------------------------------------------------------ verifier protocol


def extract(completion: str) -> str | None:
    return completion.strip() or None


def equal(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def score_many(completions: list[str], references: list[str | None]) -> list[Verdict]:
    """Verdicts for (completion, CodeTests JSON) pairs; the answer field carries a one-line test summary."""
    verdicts: list[Verdict | None] = [None] * len(completions)
    items, where = [], []
    for i, (completion, ref) in enumerate(zip(completions, references)):
        try:
            tests = CodeTests.from_json(ref) if ref else None
        except (ValueError, TypeError, KeyError) as exc:
            verdicts[i] = Verdict(False, None, f"bad code-test reference: {exc}"[:300])
            continue
        if tests is None:
            verdicts[i] = Verdict(False, None, "no tests for this problem")
            continue
        items.append((program_for(completion, tests), tests))
        where.append(i)
    for i, result in zip(where, default_pool().check_many(items)):
        error = result.error if result.error and result.error.startswith("sandbox failure") else None
        verdicts[i] = Verdict(result.passed, result.summary(), error)
    return verdicts


def verify_cli(program_file: str, tests_file: str, entry: str, limits: Limits = Limits()) -> dict[str, Any]:
    """`posttrain verify code`: one program (defining `entry`) against a HumanEval-style `check(candidate)` file."""
    with open(program_file) as fh:
        program = fh.read()
    with open(tests_file) as fh:
        test_code = fh.read()
    tests = CodeTests(entry=entry, tests=[{"name": os.path.basename(tests_file), "code": test_code + "\n\ncheck(candidate)\n"}])
    with Sandbox() as sandbox:
        result = check(sandbox, program, tests, limits)
    return asdict(result)
