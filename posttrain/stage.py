"""What a stage loop receives from the pipeline and hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from posttrain.recipe.schema import Recipe
from posttrain.tracking import MetricsLogger


@dataclass
class StageContext:
    recipe: Recipe
    stage: Any  # the stage's own config section (SFTStage, EvalStage, ...)
    model_path: str  # absolute path of the policy this stage starts from
    stage_dir: Path  # runs/<name>/<stage name>/
    logger: MetricsLogger
    resume: bool = False  # restart from the stage's last checkpoint if there is one
    resolve: Callable[[str], str] = str  # "@stage" -> that earlier stage's checkpoint; a path -> itself

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.logger.log(self.stage.name, step, metrics)


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None  # the model the next stage starts from (None: unchanged)
    details: dict[str, Any] = field(default_factory=dict)  # structured extras for summary.json (tables, digests)
