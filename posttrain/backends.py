"""Pre-flight checks of the optional backends a recipe chooses, before any actor starts. Torch-free.

vLLM is the optional extra `posttrain[vllm]` (GPU only). `validate` and `--dry-run` only note what is missing here
(a recipe written for a GPU cluster still validates on a laptop); `run` refuses, rather than failing once the
learners already hold their GPUs. The check runs where the driver runs, whose Python environment Ray's actors share.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from typing import TYPE_CHECKING

from posttrain.errors import PosttrainError

if TYPE_CHECKING:
    from posttrain.recipe.schema import Recipe

VLLM_PIN = "0.30.0"  # pyproject.toml's `vllm` extra (tests/test_vllm_backend.py keeps the two equal)


def installed_vllm() -> str | None:
    """vLLM's installed version; "" when importable without package metadata; None when not importable here."""
    try:
        if importlib.util.find_spec("vllm") is None:
            return None
    except ValueError:  # in sys.modules without a spec (a stand-in): importable, version unknown
        return ""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return ""


def check_backends(recipe: Recipe, strict: bool) -> list[str]:
    """What stands in the way of the recipe's optional backends on this machine.

    strict (run's pre-flight): raise PosttrainError when the run could not work, and return the remaining notes.
    Not strict (validate, --dry-run): return every finding as a note."""
    findings: list[tuple[str, bool]] = []  # (message, stops a run)
    if recipe.cluster.sampler.backend == "vllm":
        findings += _vllm_findings(installed_vllm())
    blocking = [message for message, stops in findings if stops]
    if strict and blocking:
        raise PosttrainError("\n".join(blocking))
    return [message for message, stops in findings if not (strict and stops)]


def _vllm_findings(found: str | None) -> list[tuple[str, bool]]:
    where = "cluster.sampler.backend: vllm"
    if found is None:
        return [(f"{where} needs vLLM, which is not installed in this Python environment ({sys.executable}): "
                 f"pip install 'posttrain[vllm]' (vllm=={VLLM_PIN}, on machines with CUDA GPUs), or set "
                 "cluster.sampler.backend: hf", True)]
    if not found:
        return [(f"{where}: vLLM is importable but its version is unknown (no package metadata); posttrain is tested "
                 f"with vllm=={VLLM_PIN}", False)]
    if found == VLLM_PIN:
        return []
    if _release(found) != _release(VLLM_PIN):  # vLLM's engine API changes between releases
        return [(f"{where}: vLLM {found} is installed, but posttrain is built against vllm=={VLLM_PIN}, whose engine "
                 f"API differs between releases: pip install 'posttrain[vllm]' to get vllm=={VLLM_PIN}", True)]
    return [(f"{where}: vLLM {found} is installed; posttrain pins {VLLM_PIN} (same release, expected to work)", False)]


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as 0.30.1+cu128."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else ()
