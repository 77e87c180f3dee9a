"""End-of-run HTML report: a stage table plus metric plots, in one self-contained file.

Reads ``metrics.jsonl`` (see :mod:`posttrain.tracking`) and ``summary.json``
from a run directory and writes ``report.html`` with PNG plots embedded as
base64 ``data:`` URIs, so the page can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain.tracking import METRICS_FILE, read_metrics

__all__ = ["write_report", "render_report", "metric_family"]

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
_RECORD_KEYS = frozenset({"stage", "step", "time"})

# Metrics sharing a family share one axes; first match wins, unmatched metrics get their own plot.
_FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("loss", re.compile(r"loss")),
    ("accuracy", re.compile(r"pass@|maj@|acc|exact_match|\bem\b|win_rate")),
    ("reward", re.compile(r"reward|score|margin")),
    ("kl", re.compile(r"\bkl|_kl|kl_|entropy")),
    ("learning rate", re.compile(r"(^|[/_])lr$|learning_rate")),
    ("grad norm", re.compile(r"grad_?norm")),
    ("importance and clip ratios", re.compile(r"ratio|clip_frac")),  # online RL: PPO ratio, learner/sampler IS
    ("response length", re.compile(r"length|truncated")),
    ("log Z", re.compile(r"log_z")),
    ("weight sync parity", re.compile(r"parity/")),
    ("throughput", re.compile(r"_per_s$")),
    ("seconds", re.compile(r"_s$|_s_max$")),
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.4rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } code { font-size: 0.85rem; word-break: break-all; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; }
.plots img { width: 520px; max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 1rem; overflow-x: auto; font-size: 0.8rem; }
.muted { color: #777; }
"""


def metric_family(name: str) -> str:
    """Group a metric name (e.g. ``train_loss``, ``eval/pass@8``) into a plot family."""
    lowered = name.lower()
    for family, pattern in _FAMILIES:
        if pattern.search(lowered):
            return family
    return name


def _series_by_stage(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{stage: {metric: [(step, value), ...]}}``, skipping nulls and non-numeric values."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for record in records:
        stage, step = record.get("stage"), record.get("step")
        if not isinstance(stage, str) or not isinstance(step, (int, float)):
            continue
        for name, value in record.items():
            if name in _RECORD_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out.setdefault(stage, {}).setdefault(name, []).append((float(step), float(value)))
    return out


def _group_families(series: Mapping[str, list[tuple[float, float]]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    families: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name in sorted(series):
        families.setdefault(metric_family(name), {})[name] = series[name]
    return families


def _plot_png(title: str, series: Mapping[str, list[tuple[float, float]]]) -> bytes:
    """Render the series on one axes as PNG bytes."""
    # Figure without pyplot: no global backend switch, no figure registry to leak.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    for name, points in series.items():
        points = sorted(points)
        steps, values = zip(*points)
        # Markers keep sparse series (e.g. a few evals) visible as points.
        ax.plot(steps, values, label=name, marker="o" if len(points) <= 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _bar_png(title: str, values: Mapping[str, float]) -> bytes:
    """One bar per metric: for stages that log each metric once (e.g. eval), where lines would be dots."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 0.5 + 0.45 * len(values)), dpi=100, layout="constrained")
    ax = fig.subplots()
    names = list(values)[::-1]  # first metric on top
    bars = ax.barh(names, [values[n] for n in names], color="#4c72b0")
    ax.bar_label(bars, fmt="%.4g", padding=3, fontsize="small")
    ax.set_title(title)
    ax.margins(x=0.15)
    ax.grid(alpha=0.3, axis="x")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _img_tag(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _stage_rows(stages: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for stage in stages:
        metrics = stage.get("metrics") or {}
        metric_html = "<br>".join(
            f"{html.escape(str(k))} = {html.escape(_fmt(v))}" for k, v in metrics.items()
        ) or '<span class="muted">none</span>'
        checkpoint = stage.get("checkpoint")
        checkpoint_html = f"<code>{html.escape(str(checkpoint))}</code>" if checkpoint else '<span class="muted">-</span>'
        wall = stage.get("wall_time_s")
        wall_html = f"{wall:.1f}" if isinstance(wall, (int, float)) else "-"
        rows.append(
            "<tr>"
            f"<td>{html.escape(str(stage.get('name', '?')))}</td>"
            f"<td>{html.escape(str(stage.get('kind', '')))}</td>"
            f"<td>{metric_html}</td><td>{checkpoint_html}</td><td>{wall_html}</td>"
            "</tr>"
        )
    header = "<tr><th>Stage</th><th>Kind</th><th>Final metrics</th><th>Checkpoint</th><th>Wall time (s)</th></tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def _stage_section(name: str, series: Mapping[str, list[tuple[float, float]]]) -> str:
    images = []
    for family, members in _group_families(series).items():
        if all(len(points) == 1 for points in members.values()):
            # Logged once: a bar chart when several metrics compare (pass@k, maj@k); a lone number stays in the table.
            if len(members) > 1:
                images.append(_img_tag(f"{name}: {family}", _bar_png(family, {k: v[0][1] for k, v in members.items()})))
        else:
            images.append(_img_tag(f"{name}: {family}", _plot_png(family, members)))
    if images:
        body = f'<div class="plots">{"".join(images)}</div>'
    elif series:
        body = '<p class="muted">Each metric was logged once: the values are in the table above.</p>'
    else:
        body = '<p class="muted">No metrics logged.</p>'
    return f"<h2>{html.escape(name)}</h2>{body}"


def _iteration_table(rows: Any) -> str:
    """A per-iteration table (e.g. ReST-EM): one row per iteration, the numeric columns in first-seen order."""
    if not isinstance(rows, list) or not rows:
        return ""
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(c, '')))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<h3>Iterations</h3><table><tr>{head}</tr>{body}</table>"


def _run_name(summary: Mapping[str, Any], run_dir: Path) -> str:
    recipe = summary.get("recipe")
    recipe = recipe if isinstance(recipe, Mapping) else {}
    for candidate in (summary.get("run_name"), recipe.get("run_name"), recipe.get("name")):
        if isinstance(candidate, str) and candidate:
            return candidate
    return run_dir.name


def render_report(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]], run_dir: Path) -> str:
    """Build the report HTML from a parsed summary and metrics records."""
    stages: list[Mapping[str, Any]] = [s for s in summary.get("stages") or [] if isinstance(s, Mapping)]
    series = _series_by_stage(records)
    # Stages that logged metrics but never reached summary.json (e.g. a crashed run) still get plots.
    known = {str(s.get("name")) for s in stages}
    stages += [{"name": name} for name in series if name not in known]

    run_name = _run_name(summary, run_dir)
    sections = "".join(
        _stage_section(str(s.get("name", "?")), series.get(str(s.get("name")), {}))
        + _iteration_table((s.get("details") or {}).get("iterations"))
        for s in stages
    )
    recipe_json = json.dumps(summary.get("recipe") or {}, indent=2, default=str)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(run_name)} - posttrain report</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(run_name)}</h1><p class=\"muted\">{html.escape(str(run_dir))}</p>"
        f"<h2>Stages</h2>{_stage_rows(stages)}{sections}"
        f"<h2>Recipe</h2><details><summary>Resolved recipe</summary><pre>{html.escape(recipe_json)}</pre></details>"
        "</body></html>\n"
    )


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory + ``os.replace`` so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from ``metrics.jsonl`` and ``summary.json``; return its path.

    Either input may be missing: the report then shows what is available.
    """
    run_dir = Path(run_dir)
    summary_path, metrics_path = run_dir / SUMMARY_FILE, run_dir / METRICS_FILE
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    if not isinstance(summary, Mapping):
        summary = {}
    records = read_metrics(metrics_path) if metrics_path.exists() else []
    out = run_dir / REPORT_FILE
    _atomic_write_text(out, render_report(summary, records, run_dir))
    return out
