"""Sandboxed executions per second on the 164 HumanEval canonical solutions, beside a bare baseline.

    python benchmarks/sandbox_throughput.py [--data ../shared/data/humaneval/HumanEval.jsonl.gz] [--workers 2]

bare:      one `python prog.py` subprocess per sample (program + tests + check call in one file), pass = exit 0.
           No isolation at all, and the verdict is the candidate's own exit code: what isolation is compared to.
sandbox:   the posttrain code verifier: namespaces, throwaway read-only root, own uids, rlimits, a separate
           checker process; pass decided outside the candidate.
process:   the same verifier with namespaces switched off (what runs where the kernel refuses them).
Each configuration runs the same samples with the same number of concurrent workers; rounds alternate.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from posttrain.data.tasks.code import humaneval_row
from posttrain.verifiers.code import CodePool, CodeTests, program_for

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"


def load(path: Path) -> list[tuple[str, CodeTests, str]]:
    """(program, tests, one-file script for the bare baseline) per task."""
    out = []
    for raw in map(json.loads, gzip.open(path, "rt")):
        row = humaneval_row(raw, raw["task_id"])
        tests = CodeTests.from_json(row["answer"])
        program = program_for(row["completion"], tests)
        script = f"{program}\n\n{raw['test']}\n\ncheck({raw['entry_point']})\n"
        out.append((program, tests, script))
    return out


def bare(samples, workers: int, workdir: str) -> tuple[float, int]:
    def one(i_script):
        i, script = i_script
        path = os.path.join(workdir, f"s{i}.py")
        with open(path, "w") as fh:
            fh.write(script)
        try:
            return subprocess.run([sys.executable, path], capture_output=True, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        passed = sum(ex.map(one, enumerate(s[2] for s in samples)))
    return time.perf_counter() - start, passed


def pooled(pool: CodePool, samples) -> tuple[float, int]:
    start = time.perf_counter()
    results = pool.check_many([(p, t) for p, t, _ in samples])
    return time.perf_counter() - start, sum(r.passed for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    samples = load(args.data)
    n = len(samples)
    times: dict[str, list[float]] = {"bare": [], "sandbox": [], "process": []}
    passes: dict[str, int] = {}
    with CodePool(workers=args.workers) as full, CodePool(workers=args.workers, isolation="process") as proc, \
            tempfile.TemporaryDirectory() as workdir:
        pooled(full, samples[:4]), pooled(proc, samples[:4])  # start the jail servers
        for _ in range(args.rounds):
            for name, fn in (("bare", lambda: bare(samples, args.workers, workdir)),
                             ("sandbox", lambda: pooled(full, samples)), ("process", lambda: pooled(proc, samples))):
                seconds, passes[name] = fn()
                times[name].append(seconds)
    print(f"HumanEval canonical solutions: {n} programs, {args.workers} concurrent workers, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{'configuration':<12} {'passed':>7} {'median s':>9} {'exec/s':>8} {'vs bare':>8}")
    base = statistics.median(times["bare"])
    for name in ("bare", "sandbox", "process"):
        med = statistics.median(times[name])
        print(f"{name:<12} {passes[name]:>4}/{n} {med:>9.2f} {n / med:>8.1f} {med / base:>7.2f}x")


if __name__ == "__main__":
    main()
