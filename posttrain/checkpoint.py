"""Atomic checkpoints: written into `<name>.tmp`, renamed into place only when complete.

A checkpoint directory is a Hugging Face model (or peft adapter) plus `deepspeed/` optimizer state
and `trainer_state.json`; a crash mid-write leaves only a `.tmp` directory, never a broken checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def begin(root: Path, step: int) -> Path:
    tmp = step_dir(root, step).with_suffix(".tmp")
    if tmp.exists():  # left over from a crash during this very save
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict[str, Any], keep_last: int) -> Path:
    """Write the trainer state, rename the directory into place, and prune older checkpoints."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    final = tmp.with_suffix("")
    if final.exists():  # re-saving the same step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in completed(final.parent)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def completed(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.suffix != ".tmp" and (p / STATE_FILE).is_file())


def latest(root: Path) -> tuple[Path, dict[str, Any]] | None:
    done = completed(root)
    return (done[-1], json.loads((done[-1] / STATE_FILE).read_text())) if done else None
