"""Metrics sinks (JSONL, Weights & Biases, TensorBoard) and progress bars.

``metrics.jsonl`` is the source of truth: it is always written, flushed after
every record, and is what :mod:`posttrain.report` reads. wandb and TensorBoard
are optional mirrors; if either cannot be imported or started, training goes on
without it after a single warning.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["WandbSettings", "MetricsLogger", "read_metrics", "progress", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"
PROGRESS_ENV = "POSTTRAIN_PROGRESS"
# Seconds between progress lines when stderr is a log file rather than a terminal.
NON_TTY_PROGRESS_INTERVAL_S = 10.0


@dataclass
class WandbSettings:
    """Weights & Biases options; ``mode`` is passed to ``wandb.init`` ("offline", "online", "disabled")."""

    project: str = "posttrain"
    mode: str = "offline"
    entity: str | None = None


def _warn(message: str) -> None:
    print(f"[posttrain] WARNING: {message}", file=sys.stderr, flush=True)


def _finite_or_none(value: Any) -> float | None:
    """Coerce a metric to float; None/NaN/inf become ``None`` so the JSON line stays valid."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _open_for_append(path: Path) -> IO[str]:
    """Open ``path`` for appending, terminating a line left half-written by a killed run.

    Without this, the first record of a resumed run would be glued onto the
    truncated line and both would be lost.
    """
    needs_newline = False
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    handle = path.open("a", encoding="utf-8")
    if needs_newline:
        handle.write("\n")
        handle.flush()
    return handle


class MetricsLogger:
    """Write metrics to ``run_dir/metrics.jsonl`` and, optionally, to wandb and TensorBoard.

    Usable as a context manager; :meth:`close` is idempotent.
    """

    def __init__(
        self,
        run_dir: Path,
        wandb: WandbSettings | None = None,
        tensorboard: bool = False,
        run_name: str = "posttrain",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._lock = threading.Lock()  # the logger may be shared by callback threads
        self._file: IO[str] | None = _open_for_append(self.path)
        self._wandb_run: Any = None
        self._wandb_stages: set[str] = set()
        self._tb_writer: Any = None
        if wandb is not None and wandb.mode != "disabled":
            self._wandb_run = _init_wandb(wandb, self.run_dir, run_name, dict(config or {}))
        if tensorboard:
            self._tb_writer = _init_tensorboard(self.run_dir / "tensorboard")

    def log(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` for ``stage`` at ``step`` in every enabled sink."""
        values = {name: _finite_or_none(value) for name, value in metrics.items()}
        record = {"stage": stage, "step": int(step), "time": time.time(), **values}
        line = json.dumps(record, allow_nan=False)
        with self._lock:
            if self._file is None:
                raise RuntimeError("MetricsLogger.log called after close()")
            self._file.write(line + "\n")
            self._file.flush()  # a killed run keeps everything logged so far
            self._log_wandb(stage, int(step), values)
            self._log_tensorboard(stage, int(step), values)

    def _log_wandb(self, stage: str, step: int, values: Mapping[str, float | None]) -> None:
        if self._wandb_run is None:
            return
        try:
            if stage not in self._wandb_stages:
                # Each stage restarts its step count, but wandb's global step must be
                # monotonic (it drops "out of order" rows), so each stage's metrics are
                # plotted against their own "<stage>/step" axis instead.
                self._wandb_run.define_metric(f"{stage}/step")
                self._wandb_run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self._wandb_stages.add(stage)
            payload: dict[str, float] = {f"{stage}/step": step}
            payload.update({f"{stage}/{k}": v for k, v in values.items() if v is not None})
            self._wandb_run.log(payload)
        except Exception as exc:  # noqa: BLE001 - a tracking outage must not stop training
            _warn(f"wandb logging failed ({exc!r}); continuing without wandb")
            self._wandb_run = None

    def _log_tensorboard(self, stage: str, step: int, values: Mapping[str, float | None]) -> None:
        if self._tb_writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self._tb_writer.add_scalar(f"{stage}/{name}", value, step)

    def close(self) -> None:
        """Flush and close every sink; safe to call more than once."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._tb_writer is not None:
                self._tb_writer.close()
                self._tb_writer = None
            if self._wandb_run is not None:
                try:
                    self._wandb_run.finish()
                except Exception as exc:  # noqa: BLE001
                    _warn(f"wandb finish failed ({exc!r})")
                self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _init_wandb(settings: WandbSettings, run_dir: Path, run_name: str, config: dict[str, Any]) -> Any:
    """Start a wandb run, or warn and return ``None`` if wandb is unavailable or fails."""
    try:
        import wandb
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken install
        _warn(f"wandb could not be imported ({exc!r}); continuing without wandb")
        return None
    try:
        return wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=run_name,
            mode=settings.mode,
            dir=str(run_dir),
            config=config,
            reinit="finish_previous",  # one logger per run; never append to a stale run
        )
    except Exception as exc:  # noqa: BLE001 - e.g. no network or no API key in online mode
        _warn(f"wandb.init failed ({exc!r}); continuing without wandb")
        return None


def _init_tensorboard(log_dir: Path) -> Any:
    """Create a TensorBoard writer, or warn and return ``None`` if ``tensorboard`` is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # noqa: BLE001 - torch raises ImportError without `tensorboard`
        _warn(f"TensorBoard unavailable ({exc!r}); `pip install tensorboard` to enable it")
        return None
    return SummaryWriter(log_dir=str(log_dir))


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file into a list of records.

    A line that does not parse (a run killed mid-write) is skipped; only a
    malformed line that is not the last one triggers a warning, since a
    truncated tail is the expected result of a kill.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if index != len(lines) - 1:
                warnings.warn(f"{path}:{index + 1}: skipping malformed metrics line", stacklevel=2)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class _LinePerUpdate:
    """Stream adapter turning tqdm's carriage-return redraws into one line per refresh.

    In a log file, ``\\r`` redraws accumulate into one enormous line; writing a
    newline per refresh keeps logs greppable.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self._stream.write(text + "\n")

    def flush(self) -> None:
        self._stream.flush()


def _progress_mode() -> str:
    """``"tty"``, ``"log"`` (non-TTY, forced on) or ``"off"``, from stderr and ``POSTTRAIN_PROGRESS``."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in {"0", "false", "no", "off"}:
        return "off"
    is_tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    if is_tty:
        return "tty"
    return "log" if forced in {"1", "true", "yes", "on"} else "off"


def progress(
    iterable: Iterable[Any] | None = None,
    total: int | float | None = None,
    desc: str = "",
    unit: str = "it",
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on stderr with ETA.

    Shown on a terminal; hidden when stderr is not a TTY unless
    ``POSTTRAIN_PROGRESS=1``, in which case it prints one line every
    ``NON_TTY_PROGRESS_INTERVAL_S`` seconds. ``POSTTRAIN_PROGRESS=0`` hides it
    everywhere. Extra keyword arguments go to ``tqdm``.
    """
    from tqdm import tqdm

    mode = _progress_mode()
    options: dict[str, Any] = {"total": total, "desc": desc, "unit": unit, "file": sys.stderr}
    if mode == "off":
        options["disable"] = True
    elif mode == "log":
        options.update(
            file=_LinePerUpdate(sys.stderr),
            mininterval=NON_TTY_PROGRESS_INTERVAL_S,
            maxinterval=NON_TTY_PROGRESS_INTERVAL_S,
            ncols=100,
            ascii=True,
        )
    else:
        options["dynamic_ncols"] = True
    options.update(kwargs)
    return tqdm(iterable, **options)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """`k=v` pairs for log lines: counts as integers, rates with 4 significant digits."""
    def one(v: Any) -> str:
        if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
            return str(int(v))
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={one(v)}" for k, v in metrics.items())
