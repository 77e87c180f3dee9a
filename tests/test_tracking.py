"""Tests for posttrain.tracking (metrics sinks, progress) and posttrain.report."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest

from posttrain.report import metric_family, write_report
from posttrain.tracking import MetricsLogger, WandbSettings, progress, read_metrics

IMG = '<img alt="'
PNG_URI = 'src="data:image/png;base64,'


def test_jsonl_records_have_stage_step_time(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log("sft", 3, {"train_loss": 1.5, "lr": 1e-5})
        # Flushed per call: readable before close.
        assert read_metrics(tmp_path / "metrics.jsonl")[0]["train_loss"] == 1.5
        logger.log("sft", 4, {"train_loss": 1.25})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 4]
    assert all(r["stage"] == "sft" and isinstance(r["time"], float) for r in records)
    assert records[0]["lr"] == pytest.approx(1e-5)


def test_non_finite_written_as_null(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log("dpo", 0, {"loss": math.nan, "kl": math.inf, "margin": -math.inf, "acc": 0.5})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    record = json.loads(line)  # strict JSON: NaN/Infinity would be non-standard tokens
    assert "NaN" not in line and "Infinity" not in line
    assert record["loss"] is None and record["kl"] is None and record["margin"] is None
    assert record["acc"] == 0.5


def test_truncated_last_line_tolerated_and_resume_appends(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path) as logger:
        logger.log("sft", 0, {"loss": 2.0})
    with path.open("a") as f:
        f.write('{"stage": "sft", "step": 1, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(path)] == [0]
    # A resumed run must not glue its first record onto the truncated line.
    with MetricsLogger(tmp_path) as logger:
        logger.log("sft", 2, {"loss": 1.0})
    with pytest.warns(UserWarning, match="malformed"):
        records = read_metrics(path)
    assert [r["step"] for r in records] == [0, 2]


def test_log_after_close_raises(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path)
    logger.close()
    logger.close()  # idempotent
    with pytest.raises(RuntimeError):
        logger.log("sft", 0, {"loss": 1.0})


def test_wandb_offline_creates_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, wandb=WandbSettings(), run_name="unit", config={"lr": 1e-5}) as logger:
        assert logger._wandb_run is not None
        logger.log("sft", 0, {"loss": 1.0, "bad": math.nan})
        logger.log("dpo", 0, {"loss": 0.5})  # a new stage restarts its step
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run directory missing"


def test_wandb_init_failure_does_not_stop_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wandb = pytest.importorskip("wandb")

    def broken_init(**_: object) -> None:
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    with MetricsLogger(tmp_path, wandb=WandbSettings(mode="online")) as logger:
        logger.log("sft", 0, {"loss": 1.0})
    assert "wandb.init failed" in capsys.readouterr().err
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_tensorboard_writes_event_files(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        logger.log("sft", 0, {"loss": 1.0})
        logger.log("sft", 5, {"loss": 0.5})
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tag = next(t for t in events.Tags()["scalars"] if t.endswith("loss"))
    assert [(e.step, e.value) for e in events.Scalars(tag)] == [(0, 1.0), (5, 0.5)]


def test_progress_disabled_off_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delenv("POSTTRAIN_PROGRESS", raising=False)
    bar = progress(range(3), desc="gen")
    assert bar.disable
    assert list(bar) == [0, 1, 2]


def test_progress_forced_on_writes_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("POSTTRAIN_PROGRESS", "1")
    bar = progress(total=4, desc="train", unit="step")
    assert not bar.disable
    bar.update(4)
    bar.close()
    output = stream.getvalue()
    assert "train" in output and "\r" not in output
    assert output.endswith("\n")


@pytest.mark.parametrize(
    ("name", "family"),
    [("train_loss", "loss"), ("eval/loss", "loss"), ("pass@1", "accuracy"), ("maj@8", "accuracy"),
     ("reward_mean", "reward"), ("kl", "kl"), ("lr", "learning rate"), ("tokens_per_s", "throughput"), ("step_s", "seconds"),
     ("parity/max_abs_diff", "weight sync parity"), ("vocab_size", "vocab_size")],
)
def test_metric_family(name: str, family: str) -> None:
    assert metric_family(name) == family


def _write_run(run_dir: Path) -> None:
    with MetricsLogger(run_dir) as logger:
        for step in range(5):
            logger.log("sft", step, {"train_loss": 2.0 - 0.3 * step})
        logger.log("sft", 4, {"eval_loss": 1.1, "pass@1": 0.41, "pass@8": 0.77})
        logger.log("rest<em>", 0, {"reward_mean": 0.2, "kl": math.nan})
        logger.log("rest<em>", 1, {"reward_mean": 0.3})
    summary = {
        "recipe": {"name": "tiny-run", "stages": [{"name": "sft", "lr": 1e-5}]},
        "stages": [
            {"name": "sft", "kind": "sft", "metrics": {"pass@1": 0.41, "pass@8": 0.77},
             "checkpoint": "/ckpt/sft", "wall_time_s": 12.5},
            {"name": "rest<em>", "kind": "rest_em", "metrics": {"pass@1": 0.4321}, "checkpoint": None},
            {"name": "eval-only", "kind": "eval"},  # logged nothing, no optional keys
        ],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _section(page: str, heading: str) -> str:
    """HTML between a stage's <h2> and the next <h2>."""
    start = page.index(f"<h2>{heading}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start:end]


def test_report_contents(tmp_path: Path) -> None:
    _write_run(tmp_path)
    out = write_report(tmp_path)
    assert out == tmp_path / "report.html"
    page = out.read_text()
    assert "tiny-run" in page
    for text in ("sft", "eval-only", "0.41", "0.77", "0.4321", "/ckpt/sft", "12.5"):
        assert text in page
    # sft: a loss plot (train+eval) and an accuracy plot; rest: reward and kl (NaN-only -> no plot).
    assert _section(page, "sft").count(PNG_URI) == 2
    assert _section(page, "rest&lt;em&gt;").count(PNG_URI) == 1
    assert PNG_URI not in _section(page, "eval-only")
    assert "No metrics logged" in _section(page, "eval-only")
    assert "<details>" in page and "&quot;lr&quot;" in page
    assert not list(tmp_path.glob(".report.html.*"))  # temp file replaced


def test_report_escapes_html(tmp_path: Path) -> None:
    _write_run(tmp_path)
    page = write_report(tmp_path).read_text()
    assert "rest<em>" not in page
    assert "rest&lt;em&gt;" in page


def test_report_without_summary_or_metrics(tmp_path: Path) -> None:
    page = write_report(tmp_path).read_text()
    assert page.startswith("<!DOCTYPE html>") and IMG not in page
    with MetricsLogger(tmp_path) as logger:
        logger.log("grpo", 1, {"reward_mean": 0.5})
    page = write_report(tmp_path).read_text()  # stage known only from metrics.jsonl
    assert PNG_URI not in _section(page, "grpo")  # a lone value logged once: no plot, it is in the table
    assert "logged once" in _section(page, "grpo")
    with MetricsLogger(tmp_path) as logger:
        logger.log("grpo", 2, {"reward_mean": 0.7})
        logger.log("eval", 0, {"pass@1": 0.3, "pass@4": 0.5, "problems": 100})
    page = write_report(tmp_path).read_text()
    assert _section(page, "grpo").count(PNG_URI) == 1  # now a series: a line plot
    assert _section(page, "eval").count(PNG_URI) == 1  # pass@1 and pass@4 side by side as bars


def test_report_renders_an_iteration_table(tmp_path: Path) -> None:
    summary = {"recipe": {"name": "r"}, "stages": [{"name": "rest_em", "kind": "rest_em", "metrics": {},
               "details": {"iterations": [{"iteration": 0, "test_pass@1": 0.5, "kept": 10, "checkpoint": "/c0"},
                                          {"iteration": 1, "test_pass@1": 0.7, "checkpoint": "/c1"}]}}]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = write_report(tmp_path).read_text()
    table = page[page.index("<h3>Iterations</h3>"):]
    assert "<th>iteration</th><th>test_pass@1</th><th>kept</th>" in table
    assert "<td>1</td><td>0.7</td><td></td>" in table and "/c0" not in table
