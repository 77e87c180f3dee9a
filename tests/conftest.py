"""Shared fixtures: a tiny model built locally, and a real local Ray with 2 CPUs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CI has no GPU; skips DeepSpeed's accelerator probe


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small Llama (hidden 64, 2 layers) + char tokenizer, written with save_pretrained."""
    from posttrain.models.tiny import TinyConfig, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", TinyConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128))


@pytest.fixture(scope="module")
def ray_local():
    """A real embedded Ray with 2 CPUs for the module's tests (the pipeline starts its own in subprocess tests)."""
    import ray

    from posttrain.pipeline import _worker_env

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": _worker_env()}, logging_level="WARNING")
    yield
    ray.shutdown()
