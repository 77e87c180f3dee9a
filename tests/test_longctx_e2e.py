"""The adjoint gradient sharded over real Ray workers, the longctx_sft stage's resume, and a sharded run of the
stage through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import posttrain
from posttrain.longctx.adjoint import Engine, loss_and_grad
from test_longctx import _batch, _grads, _model, _rel

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("split", ["layers", "time"])
def test_sharded_gradient_equals_the_single_process_one(ray_local, split):
    import ray

    from posttrain.longctx.sharded import sharded_loss_and_grad, start_shards

    m = _model(3)
    ids, labels = _batch(40)
    shards = start_shards(m, 2, split)
    try:
        for engine in (Engine("adjoint", chunk=8), Engine("adjoint", chunk=8, window=5)):
            single = _grads(m, ids, labels, engine)
            loss = loss_and_grad(m, ids, labels, engine).loss
            result = sharded_loss_and_grad(m, ids, labels, engine, shards, split)
            sharded = {n: p.grad.clone() for n, p in m.named_parameters()}
            assert _rel(sharded, single) <= 1e-12 and result.loss == pytest.approx(loss, rel=1e-12)
            assert dict(result.vjps) == {"A": 3 * 40, "B": 3 * 40, "C": 3 * 40}
    finally:
        for s in shards:
            ray.kill(s)


def _recipe(tmp: Path, steps: int, **gradient) -> dict:
    return {
        "name": "lc", "seed": 0,
        "model": {"path": str(tmp / "ssm"), "ssm": {"vocab_size": 32, "hidden_size": 16, "state_size": 4,
                                                    "num_layers": 2, "max_timescale": 100}},
        "data": {"kv": {"task": "kv_recall", "kv_recall": {"n_keys": 2, "n_values": 4, "n_filler": 8, "seq_len": 48,
                                                          "min_distance": 10, "max_distance": 30, "n_train": 64,
                                                          "n_test": 16}}},
        "cluster": {"address": "local", "num_cpus": 2},
        "tracking": {"output_dir": str(tmp / "runs"), "report": False},
        "stages": [{"kind": "longctx_sft", "data": "kv", "steps": steps, "batch_size": 4,
                    "gradient": {"engine": "adjoint", "chunk": 16, **gradient},
                    "optim": {"lr": 0.01, "warmup_steps": 2}, "eval_every": 2, "eval_rows": 16, "save_every": 2,
                    "keep_last": 10, "log_every": 1}],
    }


def _context(tmp: Path, out: Path, resume: bool):
    from posttrain.pipeline import absolute_paths, ensure_model
    from posttrain.recipe.load import load_recipe
    from posttrain.stage import StageContext
    from posttrain.tracking import MetricsLogger

    path = tmp / "lc.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp, steps=4)))
    recipe = absolute_paths(load_recipe(path))
    ensure_model(recipe)
    logger = MetricsLogger(out)
    return StageContext(recipe, recipe.stages[0], recipe.model.path, out / "stage", logger, resume=resume), logger


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from posttrain.loops.longctx import run_longctx_sft

    ctx, logger = _context(tmp_path, tmp_path / "a", resume=False)
    with logger:
        full = run_longctx_sft(ctx)
    # A second run that finds only the step-2 checkpoint (as after a crash at step 3) and resumes from it.
    ctx_b, logger_b = _context(tmp_path, tmp_path / "b", resume=True)
    (ctx_b.stage_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ctx.stage_dir / "checkpoints" / "step-000002", ctx_b.stage_dir / "checkpoints" / "step-000002")
    with logger_b:
        resumed = run_longctx_sft(ctx_b)
    a = load_file(Path(full.checkpoint) / "model.safetensors")
    b = load_file(Path(resumed.checkpoint) / "model.safetensors")
    assert Path(resumed.checkpoint).name == "step-000004"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], load_file(ctx.stage_dir / "checkpoints" / "step-000002" /
                                                          "model.safetensors")["lm_head.weight"])  # steps 3-4 trained
    assert resumed.metrics["accuracy"] == full.metrics["accuracy"]


def test_sharded_stage_runs_through_the_cli(tmp_path):
    from posttrain.longctx.ssm import load_ssm

    path = tmp_path / "lc.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, steps=3, workers=2, split="layers")))
    plan = posttrain("run", str(path), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "VJPs on 2 Ray worker(s), split by layers" in plan.stdout and "2 adjoint_shard actor(s)" in plan.stdout
    res = posttrain("run", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "lc" / "summary.json").read_text())
    (stage,) = summary["stages"]
    assert stage["status"] == "done" and 0.0 <= stage["metrics"]["accuracy"] <= 1.0
    assert stage["metrics"]["chance"] == 0.25
    model = load_ssm(stage["checkpoint"])  # a Hugging Face directory
    assert model.config.num_layers == 2
    # the metrics stream has the loss at every step and the held-out accuracy at steps 0 and 2
    rows = [json.loads(line) for line in (tmp_path / "runs" / "lc" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if "train_loss" in str(r)} >= {1, 2, 3}
