"""Run the real `posttrain` command line in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def posttrain(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "POSTTRAIN_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def small_recipe(tmp: Path, model: Path, **overrides) -> dict:
    """A quick sft -> eval recipe on a pre-built tiny model; `overrides` replace top-level sections."""
    recipe = {
        "name": "t",
        "seed": 0,
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"arith": {"task": "arithmetic", "arithmetic": {"n_sft": 64, "n_pool": 0, "n_test": 40}}},
        "cluster": {"address": "local", "num_cpus": 2,
                    "learner": {"actors": 2, "cpus": 1, "zero_stage": 2},
                    "sampler": {"actors": 1, "cpus": 1, "batch_size": 64}, "verifier": {"actors": 1, "cpus": 0.5}},
        "tracking": {"output_dir": str(tmp / "runs")},
        "stages": [
            {"kind": "sft", "data": "arith", "train_split": "sft", "eval_split": "test", "steps": 20, "batch_size": 8,
             "micro_batch_size": 2, "max_length": 48, "optim": {"lr": 3e-3, "warmup_steps": 2},
             "eval_every": 10, "eval_rows": 8, "save_every": 10, "log_every": 5},
            {"kind": "eval", "data": "arith", "split": "test", "max_new_tokens": 30, "samples": 2, "pass_k": [1, 2],
             "sampling": {"temperature": 1.0, "max_new_tokens": 30}},
        ],
    }
    recipe.update(overrides)
    return recipe


def easy_arithmetic_sft(tmp: Path, model: Path) -> dict:
    """small_recipe on 2-operand arithmetic with a 60-step SFT stage: a policy that is sometimes right."""
    recipe = small_recipe(tmp, model)
    recipe["data"] = {"arith": {"task": "arithmetic", "arithmetic": {"n_operands": 2, "max_operand": 4, "n_sft": 24,
                                                                     "n_pool": 16, "n_test": 10}}}
    recipe["stages"] = [
        {"kind": "sft", "data": "arith", "train_split": "sft", "steps": 60, "batch_size": 8, "micro_batch_size": 2,
         "max_length": 32, "optim": {"lr": 5e-3, "warmup_steps": 5}, "save_every": 60, "log_every": 20},
    ]
    return recipe


def write(tmp: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_and_kill(recipe: Path, name: str, marker: Path, timeout: float = 300) -> None:
    """Start `posttrain run recipe name=NAME` and SIGKILL it (the driver and everything it started) as soon as
    `marker` exists: a run interrupted mid-stage, as by a lost node."""
    import signal
    import time

    env = {**os.environ, "POSTTRAIN_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe), f"name={name}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, f"run ended before {marker} appeared"
        time.sleep(0.01)  # a tiny model's next step and final checkpoint can take well under 0.2 s
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

