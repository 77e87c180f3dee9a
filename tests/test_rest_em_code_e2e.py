"""Code self-training end to end on CPU: sample programs -> sandboxed verification -> fine-tune, via the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_helpers import posttrain, small_recipe, write

pytestmark = pytest.mark.slow


def _bare_check(program: str, asserts: list[str]) -> bool:
    """An independent judge: plain Python in a subprocess, pass = every assert holds (exit 0)."""
    script = program + "\n" + "\n".join(asserts) + "\n"
    try:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_rest_em_with_the_code_verifier(tmp_path, tiny_model):
    recipe = small_recipe(tmp_path, tiny_model)
    recipe["data"] = {"fn": {"task": "functions", "functions": {"max_steps": 1, "n_sft": 30, "n_pool": 20, "n_test": 10}}}
    recipe["cluster"]["verifier"] = {"actors": 1, "cpus": 0.5, "workers": 2}
    recipe["stages"] = [
        {"kind": "sft", "data": "fn", "train_split": "sft", "steps": 200, "batch_size": 8, "micro_batch_size": 2,
         "max_length": 64, "optim": {"lr": 1e-2, "warmup_steps": 10}, "save_every": 200, "log_every": 50},
        # E-step on the demonstrations' prompts: the model has seen them, so some programs pass for sure
        {"kind": "rest_em", "data": "fn", "train_split": "sft", "eval_split": "test", "iterations": 1,
         "samples_per_problem": 8, "max_per_problem": 2, "sampling": {"temperature": 1.0, "max_new_tokens": 16},
         "m_step": {"steps": 4, "batch_size": 8, "micro_batch_size": 2, "max_length": 64, "log_every": 2},
         "eval_sampling": {"max_new_tokens": 16}},
    ]
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    rest = json.loads((run / "summary.json").read_text())["stages"][1]
    table = rest["details"]["iterations"]
    assert [r["iteration"] for r in table] == [0, 1] and "test_pass@1" in table[0]
    assert not any(k.startswith(("test_maj", "train_maj")) for r in table for k in r)  # no voting on programs

    samples = [json.loads(l) for l in (run / "rest_em" / "iter-1" / "e_step_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 30 * 8 and table[0]["kept"] == sum(s["kept"] for s in samples) > 0
    for s in samples:  # every sandbox verdict agrees with an independent, unsandboxed run of the same program
        tests = json.loads(s["reference"])
        program = tests["prefix"] + s["completion"]
        assert s["correct"] == _bare_check(program, [t["code"] for t in tests["tests"]]), s
        assert s["answer"].startswith("passed 4/4" if s["correct"] else "failed")
        if s["kept"]:
            assert s["correct"] and s["finished"]
