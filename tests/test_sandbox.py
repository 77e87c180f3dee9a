"""The code sandbox: containment of hostile programs, un-foolable verdicts, real benchmarks, the pool."""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
from pathlib import Path

import pytest

from posttrain.verifiers import _jail
from posttrain.verifiers.code import CodePool, CodeTests, check, outputs_match, program_for, score_many
from posttrain.verifiers.sandbox import Limits, Sandbox
from sandbox_attacks import ATTACKS, GOOD, TEST, Host, program, sandbox_procs

DATA = Path(os.environ.get("POSTTRAIN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FAST = Limits(cpu_seconds=2, memory_mb=512, test_seconds=2.0, load_seconds=2.0)
SQUARE = CodeTests(entry="solve", tests=TEST)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and uid separation need root")


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox() as sb:
        yield sb


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = Host.make(tmp_path_factory.mktemp("host"))
    yield h
    h.listener.close()
    os.environ.pop("POSTTRAIN_SECRET", None)


def test_attack_list_is_broad():
    assert len({a.name for a in ATTACKS}) >= 20


@needs_root
@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_fails_and_is_contained(attack, sandbox, host):
    result = check(sandbox, program(attack, host), SQUARE, FAST)
    assert not result.passed, result
    if attack.expect:
        assert result.tests[0]["status"] == attack.expect, result
    assert attack.host_ok(host, result), result
    assert result.wall_s < FAST.wall_seconds(1) + 1
    # the next candidate, in the same jail server, is unaffected
    after = check(sandbox, GOOD, SQUARE, FAST)
    assert after.passed, after


@needs_root
def test_isolation_is_reported(sandbox):
    raw = sandbox.run_function(GOOD, "solve", TEST, limits=FAST)
    assert raw["isolation"] == {"namespaces": True, "why_not": "", "uid_drop": True}


@needs_root
def test_tests_never_reach_the_candidates_memory(sandbox):
    """The expected value sits in the test code; a candidate that searches its whole heap must not find it."""
    secret = "SECRET-" + os.urandom(8).hex()
    candidate = """
import ctypes, gc, re
PATTERN = re.compile(r"SECRET-[0-9a-f]{16}")  # cannot match its own text: only the real value would
def solve(x):
    for obj in gc.get_objects():
        for s in (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()):
            if isinstance(s, str) and PATTERN.search(s):
                return PATTERN.search(s).group(0)
    for line in open("/proc/self/maps").read().splitlines():  # the whole address space, via ctypes
        addr, perms = line.split()[:2]
        if not perms.startswith("r") or line.endswith(("[vvar]", "[vsyscall]", "[vvar_vclock]")):
            continue
        lo, hi = (int(a, 16) for a in addr.split("-"))
        found = re.search(rb"SECRET-[0-9a-f]{16}", ctypes.string_at(lo, hi - lo))
        if found:
            return found.group(0).decode()
    return "not found"
"""
    tests = CodeTests(entry="solve", tests=[{"name": "t", "code": f"assert candidate(0) == {secret!r}"}])
    result = check(sandbox, candidate, tests, Limits(test_seconds=20))
    assert result.tests[0]["status"] == "failed", result
    # control: the same search does find the value once it is in the candidate's memory (here via fixtures)
    planted = CodeTests(entry="solve", tests=tests.tests, fixtures=f"_planted = {secret[:9]!r} + {secret[9:]!r}")
    assert check(sandbox, candidate, planted, Limits(test_seconds=20)).passed


def test_per_test_outcomes_and_exceptions(sandbox):
    program = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x + 1\n"
    tests = CodeTests(entry="f", tests=[
        {"name": "ok", "code": "assert f(1) == 2"},
        {"name": "wrong", "code": "assert f(2) == 4, 'f(2) should be 4'"},
        {"name": "raises", "code": "f(-1)"},
        {"name": "expects ValueError", "code": "try:\n    f(-5)\n    assert False\nexcept ValueError:\n    pass"},
    ])
    result = check(sandbox, program, tests, FAST)
    assert [t["status"] for t in result.tests] == ["passed", "failed", "error", "passed"]
    assert result.tests[1]["message"] == "AssertionError: f(2) should be 4"
    assert result.tests[2]["message"] == "ValueError: negative"
    assert not result.passed and result.summary().startswith("failed 2/4")


def test_containers_cross_as_trusted_types(sandbox):
    program = "from collections import Counter, deque\ndef f(s):\n    return Counter(s), deque([1, 2]), {1: [2.5, None]}, b'x', 1+2j\n"
    tests = CodeTests(entry="f", tests=[{"name": "t", "code": "from collections import Counter, deque\n"
                                         "c, d, m, b, z = f('aab')\nassert c == Counter({'a': 2, 'b': 1}) and type(c) is Counter\n"
                                         "assert d == deque([1, 2]) and m == {1: [2.5, None]} and b == b'x' and z == 1+2j"}])
    assert check(sandbox, program, tests, FAST).passed


def test_stdio_cases(sandbox):
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    good = CodeTests(cases=[("1 2\n", "3\n"), ("10 -4", "6")])
    assert check(sandbox, program, good, FAST).passed
    wrong = check(sandbox, program, CodeTests(cases=[("1 2", "3"), ("2 2", "5")]), FAST)
    assert [t["status"] for t in wrong.tests] == ["passed", "failed"]
    broken = check(sandbox, "print(1/0)", CodeTests(cases=[("", "1")]), FAST)
    assert broken.tests[0]["status"] == "error" and "ZeroDivisionError" in broken.error
    slow = check(sandbox, "while True: pass", CodeTests(cases=[("", "1")]), FAST)
    assert slow.timeout and slow.tests[0]["status"] == "timeout"
    assert outputs_match("3 \n4\n\n", "3\n4") and not outputs_match("34", "3 4")


def test_program_for_takes_fenced_code_or_prefix():
    tests = CodeTests(entry="f", tests=[{"name": "t", "code": "assert f() == 1"}], prefix="def f():\n")
    assert program_for("    return 1\n", tests) == "def f():\n    return 1\n"
    assert program_for("Here:\n```python\ndef f():\n    return 1\n```\nDone.", tests) == "def f():\n    return 1\n"


def test_value_codec_is_strict():
    value = [None, True, 3, 2.5, float("inf"), "s", b"b", (1,), {2}, frozenset([3]), {"k": [1j]}]
    assert _jail.decode_value(json.loads(json.dumps(_jail.encode_value(value)))) == value
    with pytest.raises(TypeError):
        _jail.encode_value(type("Int", (int,), {})(1))
    for bad in (["i", "3"], ["b", 1], ["x"], ["l", [["i", 1], "oops"]], ["D", "Evil", []], "N", []):
        with pytest.raises((ValueError, TypeError)):
            _jail.decode_value(bad)


def test_score_many_verdicts(monkeypatch):
    tests = CodeTests(entry="solve", tests=TEST, prefix="def solve(x):\n")
    verdicts = score_many(["    return x * x\n", "    return x + x\n", "    return x * x\n"],
                          [tests.to_json(), tests.to_json(), "not json"])
    assert [v.correct for v in verdicts] == [True, False, False]
    assert verdicts[0].answer == "passed 1/1" and verdicts[0].error is None
    assert "bad code-test reference" in verdicts[2].error


def test_process_isolation_fallback_still_limits_and_cleans_up(tmp_path):
    probe = "import os\ndef solve(x):\n    print(sorted(os.environ), os.getcwd())\n    return x * x\n"
    with Sandbox(isolation="process") as sb:
        raw = sb.run_function(probe, "solve", TEST, limits=FAST)
        result = check(sb, probe, SQUARE, FAST)
    assert raw["isolation"]["namespaces"] is False and raw["checker"]["tests"][0]["status"] == "passed"
    assert result.passed
    env, cwd = result.stdout.split(" ")
    assert env == "[]" and not Path(cwd.strip()).exists()  # empty environment; the directory was removed


def test_pool_back_pressure_and_hung_programs():
    hang = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ndef solve(x):\n    while True:\n        pass\n"
    limits = Limits(cpu_seconds=30, test_seconds=1.0, load_seconds=1.0)
    with CodePool(workers=1, queue=0, limits=limits) as pool:
        first = pool.submit(hang, SQUARE)
        started = time.monotonic()
        second = pool.submit(GOOD, SQUARE)  # blocks: one running, no queue
        assert time.monotonic() - started > 0.5 and first.done()
        assert first.result().timeout and second.result().passed
        # the jail server dies: the next execution restarts it
        os.kill(pool.sandbox._proc.pid, 9)
        pool.sandbox._proc.wait()
        assert pool.submit(GOOD, SQUARE).result().passed


def test_pool_runs_concurrently():
    slow = "import time\ndef solve(x):\n    time.sleep(0.5)\n    return x * x\n"
    with CodePool(workers=2) as pool:
        pool.check_many([(GOOD, SQUARE)])  # start the jail server
        started = time.monotonic()
        results = pool.check_many([(slow, SQUARE)] * 4)
        elapsed = time.monotonic() - started
    assert all(r.passed for r in results)
    assert 0.9 < elapsed < 1.8  # 4 x 0.5 s on 2 workers


def test_no_sandbox_process_outlives_its_execution(sandbox):
    leave = "import os, time\nif os.fork() == 0:\n    time.sleep(30)\ndef solve(x):\n    return x * x\n"
    results = [check(sandbox, leave, SQUARE, FAST) for _ in range(3)]
    assert all(r.passed for r in results)  # a legitimate program may fork; its children just don't survive
    time.sleep(0.3)
    assert sandbox_procs() == []


# ------------------------------------------------------------------------------------- real data


def _humaneval():
    path = DATA / "humaneval" / "HumanEval.jsonl.gz"
    if not path.exists():
        pytest.skip(f"no HumanEval at {path}")
    from posttrain.data.tasks.code import humaneval_row

    return [humaneval_row(r, r["task_id"]) for r in map(json.loads, gzip.open(path, "rt"))]


def test_humaneval_canonical_pass_and_wrong_bodies_fail():
    rows = _humaneval()
    assert len(rows) == 164
    with CodePool(workers=2) as pool:
        specs = [CodeTests.from_json(r["answer"]) for r in rows]
        right = pool.check_many([(program_for(r["completion"], t), t) for r, t in zip(rows, specs)])
        wrong = pool.check_many([(program_for("    return None\n", t), t) for t in specs])
    assert [r["id"] for r, res in zip(rows, right) if not res.passed] == []
    assert [r["id"] for r, res in zip(rows, wrong) if res.passed] == []


def test_mbpp_reference_code_passes_its_asserts():
    path = DATA / "mbpp" / "mbpp.jsonl"
    if not path.exists():
        pytest.skip(f"no MBPP at {path}")
    from posttrain.data.tasks.code import mbpp_row

    rows = [mbpp_row(r, str(r["task_id"])) for r in map(json.loads, open(path))]
    with CodePool(workers=2) as pool:
        results = pool.check_many([(r["completion"], CodeTests.from_json(r["answer"])) for r in rows])
    failing = {r["id"]: res for r, res in zip(rows, results) if not res.passed}
    # Task 601's asserts build arguments from `Pair`, a class the program under test defines; the checker
    # only accepts plain values from the candidate, so such a test cannot be judged (the price of
    # un-foolable comparisons).
    assert sorted(failing) == ["601"], {k: v.summary() for k, v in failing.items()}
    assert "returned an object of type Pair" in failing["601"].error
    assert len(rows) == 974


def test_verifier_actors_score_programs_through_ray(ray_local):
    """The code verifier as deployed: VerifierWorker actors, each with its sandbox pool, fed by the driver's verify()."""
    from posttrain.cluster import Demand, spawn
    from posttrain.loops.evaluate import verify
    from posttrain.workers.sampler import Rollouts
    from posttrain.workers.verifier import VerifierWorker

    tests = CodeTests(entry="solve", tests=TEST, prefix="def solve(x):\n").to_json()
    bodies = ["    return x * x\n", "    return x + x\n", "    import os\n    os._exit(0)\n",
              "    while True:\n        pass\n", "    return x ** 2\n", "    return None\n"]
    roll = Rollouts(prompt_index=list(range(len(bodies))), completion_ids=[[1]] * len(bodies),
                    logprobs=[[0.0]] * len(bodies), text=bodies, finished=[True] * len(bodies), version=0)
    with spawn(VerifierWorker, Demand("verifier", 2, 0.5, 0.0), [("code", 2)] * 2) as actors:
        started = time.monotonic()
        verdicts = verify(actors, roll, [tests] * len(bodies))
    assert [v.correct for v in verdicts] == [True, False, False, False, True, False]
    assert "timeout" in verdicts[3].answer and time.monotonic() - started < 30
