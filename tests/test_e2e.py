"""Whole runs through the real CLI: local Ray, DeepSpeed learners, HF samplers; kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import REPO, posttrain, run_and_kill, small_recipe, write

pytestmark = pytest.mark.slow


def _metrics(run, stage):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["stage"] == stage]


def test_sft_then_eval_run(tmp_path, tiny_model):
    recipe = small_recipe(tmp_path, tiny_model)
    recipe["tracking"].update(wandb=True, tensorboard=True)  # offline wandb by default
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    losses = [m["train_loss"] for m in _metrics(run, "sft") if "train_loss" in m]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    summary = json.loads((run / "summary.json").read_text())
    sft, ev = summary["stages"]
    assert sft["status"] == ev["status"] == "done" and summary["recipe"]["name"] == "t"
    assert sft["checkpoint"].endswith("sft/checkpoints/step-000020")

    # The checkpoint is a plain HF model: transformers loads it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(sft["checkpoint"])
    AutoTokenizer.from_pretrained(sft["checkpoint"])
    # pass@1 equals a recount of the verdicts written beside it.
    greedy = [json.loads(l) for l in (run / "eval" / "samples_greedy.jsonl").read_text().splitlines()]
    assert len(greedy) == 40
    assert ev["metrics"]["pass@1"] == pytest.approx(sum(r["correct"] for r in greedy) / 40)
    assert {"pass@1", "pass@1_sampled", "pass@2", "maj@1", "maj@2"} <= set(ev["metrics"])
    assert ev["metrics"]["pass@2"] >= ev["metrics"]["pass@1_sampled"]
    assert list((run / "wandb").glob("offline-run-*")), "wandb (offline) wrote no run"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "pass@1" in html
    # --resume on a finished run skips every stage and changes nothing.
    res = posttrain("run", str(tmp_path / "recipe.yaml"), "--resume")
    assert res.returncode == 0 and "already done" in res.stderr
    assert json.loads((run / "summary.json").read_text())["stages"][0]["metrics"] == sft["metrics"]


def test_killed_run_resumes_to_the_same_result(tmp_path, tiny_model):
    recipe = small_recipe(tmp_path, tiny_model)
    recipe["stages"][0].update(steps=40, save_every=10, eval_every=40)
    recipe["stages"][1].update(samples=0, max_problems=8)
    path = write(tmp_path, recipe)

    res = posttrain("run", str(path), "name=straight")
    assert res.returncode == 0, res.stderr[-3000:]

    ckpts = tmp_path / "runs" / "killed" / "sft" / "checkpoints"
    run_and_kill(path, "killed", ckpts / "step-000010" / "trainer_state.json")  # mid-stage
    summary = json.loads((tmp_path / "runs" / "killed" / "summary.json").read_text())
    assert summary["stages"][0]["status"] == "running"

    res = posttrain("run", str(path), "name=killed", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    a = load_file(tmp_path / "runs" / "straight" / "sft" / "checkpoints" / "step-000040" / "model.safetensors")
    b = load_file(ckpts / "step-000040" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    s1 = json.loads((tmp_path / "runs" / "straight" / "summary.json").read_text())["stages"]
    s2 = json.loads((tmp_path / "runs" / "killed" / "summary.json").read_text())["stages"]
    assert s2[0]["metrics"]["train_loss"] == pytest.approx(s1[0]["metrics"]["train_loss"], abs=1e-6)
    assert s2[1]["metrics"]["pass@1"] == s1[1]["metrics"]["pass@1"]


def test_lora_run_saves_a_peft_adapter_and_export_merges_it(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = small_recipe(tmp_path, tiny_model)
    recipe["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj"]}
    recipe["stages"][1].update(samples=0, max_problems=8)
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / "runs" / "t" / "sft" / "checkpoints" / "step-000020"
    assert (ckpt / "adapter_config.json").exists() and (ckpt / "adapter_model.safetensors").exists()
    assert not (ckpt / "model.safetensors").exists()
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert summary["stages"][0]["metrics"]["trainable_params"] < 0.1 * sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())

    res = posttrain("export", str(ckpt), str(tmp_path / "merged"))
    assert res.returncode == 0, res.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), ckpt)
    ids = torch.tensor([[5, 17, 30, 22, 9, 41]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-5)
    res = posttrain("export", str(ckpt), str(tmp_path / "merged"))
    assert res.returncode == 2 and "already exists" in res.stderr


def test_a_crashed_learner_stops_the_run_cleanly_with_checkpoints_intact(tmp_path, tiny_model):
    recipe = small_recipe(tmp_path, tiny_model)
    recipe["stages"][0].update(steps=400, save_every=10, eval_every=400)
    path = write(tmp_path, recipe)
    env = {**os.environ, "POSTTRAIN_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpts = tmp_path / "runs" / "t" / "sft" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-000010" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.2)
    pids = subprocess.run(["pgrep", "-f", "ray::LearnerWorker"], capture_output=True, text=True).stdout.split()
    assert len(pids) == 2, pids
    os.kill(int(pids[-1]), signal.SIGKILL)  # one rank of the DeepSpeed group dies mid-training
    try:
        _, stderr = proc.communicate(timeout=120)  # the survivor sits in a collective: the driver must not wait on it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, stderr[-2000:]
    assert "a worker process died" in stderr and "--resume" in stderr and "Traceback" not in stderr
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert summary["stages"][0]["status"] == "failed"
    latest = sorted(p.name for p in ckpts.iterdir() if not p.name.endswith(".tmp"))[-1]
    assert (ckpts / latest / "model.safetensors").exists() and (ckpts / latest / "trainer_state.json").exists()
