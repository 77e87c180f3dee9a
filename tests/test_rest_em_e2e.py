"""ReST-EM through the real CLI on an easy arithmetic task: filter, cap, M-step start, per-iteration table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from cli_helpers import REPO, easy_arithmetic_sft, posttrain, write

pytestmark = pytest.mark.slow


def _rest_em_recipe(tmp_path, tiny_model) -> dict:
    recipe = easy_arithmetic_sft(tmp_path, tiny_model)
    recipe["stages"] += [
        {"kind": "rest_em", "data": "arith", "train_split": "pool", "eval_split": "test", "iterations": 2,
         "samples_per_problem": 6, "max_per_problem": 2, "sampling": {"temperature": 1.0, "max_new_tokens": 20},
         "m_step": {"steps": 6, "batch_size": 8, "micro_batch_size": 2, "max_length": 32, "log_every": 3},
         "eval_samples": 2, "eval_sampling": {"temperature": 1.0, "max_new_tokens": 20}},
    ]
    return recipe


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model):
    """One uninterrupted run, shared: inspected by the first test, the reference for the resumed one."""
    tmp = tmp_path_factory.mktemp("rest_em")
    path = write(tmp, _rest_em_recipe(tmp, tiny_model))
    res = posttrain("run", str(path), "name=straight")
    assert res.returncode == 0, res.stderr[-3000:]
    return path, tmp / "runs" / "straight"


def test_rest_em_keeps_verified_capped_samples_and_restarts_each_m_step_from_base(straight):
    from transformers import AutoModelForCausalLM

    from posttrain.data.tasks.arithmetic import is_correct
    from posttrain.models.load import weights_digest

    run = straight[1]
    summary = json.loads((run / "summary.json").read_text())
    sft, rest = summary["stages"]
    table = rest["details"]["iterations"]
    assert [r["iteration"] for r in table] == [0, 1, 2]
    assert all("test_pass@1" in r and "test_maj@2" in r for r in table)

    base_digest = weights_digest(AutoModelForCausalLM.from_pretrained(sft["checkpoint"]))
    for it, row in enumerate(table[:-1], start=1):
        # The M-step started from the SFT checkpoint's weights (paper default: fine-tune the base each iteration).
        assert row["m_step_start"] == sft["checkpoint"] and row["m_step_start_digest"] == base_digest
        samples = [json.loads(l) for l in (run / "rest_em" / f"iter-{it}" / "e_step_samples.jsonl").read_text().splitlines()]
        assert len(samples) == 16 * 6 and row["kept"] == sum(s["kept"] for s in samples) > 0
        # Kept = exactly the verified, finished samples (checked again here), de-duplicated and capped per problem.
        by_problem = defaultdict(list)
        for s in samples:
            assert s["correct"] == is_correct(s["completion"], s["reference"])
            by_problem[s["id"]].append(s)
        for rows in by_problem.values():
            expected, seen = [], set()
            for s in rows:
                if s["correct"] and s["finished"] and s["completion"] not in seen and len(seen) < 2:
                    seen.add(s["completion"])
                    expected.append(True)
                else:
                    expected.append(False)
            assert [s["kept"] for s in rows] == expected
    assert rest["checkpoint"] == table[-1]["checkpoint"] == table[-2]["checkpoint"]
    assert "<h3>Iterations</h3>" in (run / "report.html").read_text()


def test_rest_em_resumes_after_the_last_finished_iteration(straight):
    path, straight_run = straight
    tmp_path = path.parent

    env = {**os.environ, "POSTTRAIN_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(path), "name=killed"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    table = tmp_path / "runs" / "killed" / "rest_em" / "iterations.json"
    deadline = time.time() + 300
    while not (table.exists() and len(json.loads(table.read_text())) == 1):  # iteration 0 (with M-step 1) finished
        assert proc.poll() is None and time.time() < deadline, "run ended before its first iteration finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = json.loads(table.read_text())

    res = posttrain("run", str(path), "name=killed", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = json.loads((tmp_path / "runs" / "killed" / "summary.json").read_text())["stages"][1]["details"]["iterations"]
    uninterrupted = json.loads((straight_run / "summary.json").read_text())["stages"][1]["details"]["iterations"]
    assert resumed[:1] == before  # the finished iteration was kept, not redone
    numbers = lambda rows: [{k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "wall_s"} for r in rows]
    assert numbers(resumed) == numbers(uninterrupted)  # and the run ends exactly where an uninterrupted one does
