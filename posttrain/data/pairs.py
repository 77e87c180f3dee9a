"""Preference pairs (DPO family): rows loaded with the same code as `datasets.py`, normalised to

  id (str), prompt (str), chosen (str), rejected (str), messages (str | None),
  score_chosen, score_rejected (float | None: judge scores, when the rows carry them), row (int, 1-based)

`chosen` and `rejected` are the two completions of one shared prompt. Conversational rows keep their
prompt as JSON `messages` (rendered with the model's chat template at tokenisation) and an empty `prompt`,
like `messages` rows in `datasets.py`.

Three row formats:
  prompt_chosen_rejected  {"prompt": str, "chosen": str, "rejected": str}
  conversational          {"prompt": [{role, content}, ...], "chosen": [assistant message(s)] or str,
                           "rejected": same}
  hh                      Anthropic HH-RLHF: {"chosen": transcript, "rejected": transcript}, two full
                           "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogues; split with `split_hh`.

Bad rows are skipped and counted by reason in a `PairReport` (or, with skip_bad_rows=False, the first one
raises PosttrainError). Row numbers are 1-based: the line number for JSON-lines files, else the row's
position in the split.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import datasets

from posttrain.data.datasets import _load_rows
from posttrain.errors import PosttrainError
from posttrain.recipe.schema import DatasetConfig

log = logging.getLogger(__name__)

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"

# Skip reasons, in report order, with the words used in logs and errors.
MISSING = "missing_fields"
EMPTY = "empty_completion"
IDENTICAL = "identical"
TOO_LONG = "too_long"
UNSPLITTABLE = "unsplittable"
REASONS: dict[str, str] = {
    MISSING: "missing or malformed fields",
    EMPTY: "empty completion",
    IDENTICAL: "identical chosen/rejected",
    TOO_LONG: "over max_chars",
    UNSPLITTABLE: "unsplittable HH transcripts",
}
FORMATS = ("prompt_chosen_rejected", "conversational", "hh")
MAX_EXAMPLES = 5  # example row numbers kept per reason


class PairRow(TypedDict):
    id: str
    prompt: str  # plain-text prompt ("" for conversational rows, whose prompt is in `messages`)
    chosen: str  # the preferred completion
    rejected: str  # the dispreferred completion
    messages: str | None  # JSON list of {role, content}: the conversational prompt, else None
    score_chosen: float | None  # judge / reward scores when the data has them (UltraFeedback style), else None
    score_rejected: float | None
    row: int  # 1-based row number in the source (the line of a JSON-lines file), for reports


class PairError(ValueError):
    """A row that cannot become a preference pair; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class PairReport:
    """What load_pairs read, kept and skipped (counts per reason, up to 5 example row numbers each)."""

    name: str
    split: str
    fmt: str
    rows_read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    examples: dict[str, list[int]] = field(default_factory=dict)  # reason -> first row numbers
    first_error: dict[str, str] = field(default_factory=dict)  # reason -> the first row's message

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, reason: str, row_number: int, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        rows = self.examples.setdefault(reason, [])
        if len(rows) < MAX_EXAMPLES:
            rows.append(row_number)
        self.first_error.setdefault(reason, f"row {row_number}: {message}")

    def summary(self) -> str:
        head = (f"data.{self.name} split {self.split!r} ({self.fmt}): read {self.rows_read} rows, "
                f"kept {self.kept}, skipped {self.skipped_total}")
        parts = []
        for reason in sorted(self.skipped, key=lambda r: list(REASONS).index(r)):
            rows = self.examples[reason]
            more = " ..." if self.skipped[reason] > len(rows) else ""
            parts.append(f"{REASONS[reason]}: {self.skipped[reason]} (rows {', '.join(map(str, rows))}{more})")
        return head + (" - " + "; ".join(parts) if parts else "")


# ------------------------------------------------------------------ HH split
def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH transcripts into (prompt, chosen_completion, rejected_completion).

    The prompt is the longest common prefix moved back to the end of its last "\\n\\nAssistant:" marker,
    so it ends with "\\n\\nAssistant:" and prompt + completion gives back each transcript exactly. This is
    right where splitting each transcript at its own last marker is not: replies that begin with the same
    words (they stay in both completions), replies that hold more "Assistant:" turns themselves (they
    stay in the completion, and the prompt is the same for both).

    Raises PairError (a ValueError) with a reason when the pair cannot be split: identical transcripts,
    no shared prefix ending at an assistant turn, dialogues that differ in a human turn (different
    prompts), or an empty (whitespace-only) completion.
    """
    if chosen == rejected:
        raise PairError(IDENTICAL, "chosen and rejected transcripts are identical")
    k = _common_prefix_len(chosen, rejected)
    cut = chosen.rfind(ASSISTANT, 0, k)  # the last marker lying wholly inside the common prefix
    if cut < 0:
        raise PairError(UNSPLITTABLE, f"no common dialogue prefix ending at an assistant turn "
                                      f"(the transcripts differ from character {k}: {chosen[k:k + 30]!r} vs {rejected[k:k + 30]!r})")
    end = cut + len(ASSISTANT)
    if HUMAN in chosen[end:k]:
        # Both go on past the shared assistant turn into the same human turn, then differ: the prompts differ.
        raise PairError(UNSPLITTABLE, f"the dialogues differ in a human turn (from character {k}: "
                                      f"{chosen[k:k + 30]!r} vs {rejected[k:k + 30]!r}), so they do not share a prompt")
    prompt = chosen[:end]
    if HUMAN not in prompt:
        raise PairError(UNSPLITTABLE, "the shared prompt has no human turn")
    chosen_completion, rejected_completion = chosen[end:], rejected[end:]
    for side, text in (("chosen", chosen_completion), ("rejected", rejected_completion)):
        if not text.strip():
            raise PairError(EMPTY, f"the {side} reply after the shared prompt is empty ({text!r})")
    if chosen_completion.strip() == rejected_completion.strip():
        raise PairError(IDENTICAL, "chosen and rejected replies differ only in whitespace")
    return prompt, chosen_completion, rejected_completion


# -------------------------------------------------------------- row adapters
def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        raise PairError(MISSING, f"missing field {key!r}")
    if not isinstance(value, str):
        raise PairError(MISSING, f"{key!r} must be a string, not {type(value).__name__}")
    return value


def _check_completions(chosen: str, rejected: str) -> None:
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise PairError(EMPTY, f"{side!r} is empty")
    if chosen.strip() == rejected.strip():
        raise PairError(IDENTICAL, "'chosen' and 'rejected' are the same text")


def _prompt_chosen_rejected(row: dict[str, Any], rid: str) -> tuple[PairRow, int]:
    prompt, chosen, rejected = _text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected")
    if not prompt.strip():
        raise PairError(MISSING, "'prompt' is empty")
    _check_completions(chosen, rejected)
    return PairRow(id=rid, prompt=prompt, chosen=chosen, rejected=rejected, messages=None, **_scores(row)), len(prompt)


def _scores(row: dict[str, Any]) -> dict[str, float | None]:
    """Optional score_chosen / score_rejected columns: numbers, or absent."""
    out: dict[str, float | None] = {}
    for key in ("score_chosen", "score_rejected"):
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise PairError(MISSING, f"{key!r} must be a number, not {type(value).__name__}")
        out[key] = None if value is None else float(value)
    return out


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _completion_text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        raise PairError(MISSING, f"missing field {key!r}")
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value or not all(_is_message(m) for m in value):
        raise PairError(MISSING, f"{key!r} must be a string or a non-empty list of {{role, content}} messages")
    roles = sorted({m["role"] for m in value} - {"assistant"})
    if roles:
        raise PairError(MISSING, f"{key!r} must hold assistant messages only, not {roles}")
    return "\n\n".join(m["content"] for m in value)


def _conversational(row: dict[str, Any], rid: str) -> tuple[PairRow, int]:
    prompt = row.get("prompt")
    if prompt is None:
        raise PairError(MISSING, "missing field 'prompt'")
    if not isinstance(prompt, list) or not prompt or not all(_is_message(m) for m in prompt):
        raise PairError(MISSING, "'prompt' must be a non-empty list of {role, content} messages")
    chosen, rejected = _completion_text(row, "chosen"), _completion_text(row, "rejected")
    _check_completions(chosen, rejected)
    history = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return (PairRow(id=rid, prompt="", chosen=chosen, rejected=rejected, messages=json.dumps(history), **_scores(row)),
            sum(len(m["content"]) for m in history))


def _hh(row: dict[str, Any], rid: str) -> tuple[PairRow, int]:
    prompt, chosen, rejected = split_hh(_text(row, "chosen"), _text(row, "rejected"))
    return PairRow(id=rid, prompt=prompt, chosen=chosen, rejected=rejected, messages=None, **_scores(row)), len(prompt)


ADAPTERS: dict[str, Callable[[dict[str, Any], str], tuple[PairRow, int]]] = {
    "prompt_chosen_rejected": _prompt_chosen_rejected,
    "conversational": _conversational,
    "hh": _hh,
}


def adapt_row(fmt: str, row: dict[str, Any], rid: str, max_chars: int | None = None,
              require_scores: bool = False) -> PairRow:
    """One raw row -> PairRow, or PairError naming the reason it is unusable."""
    if fmt not in ADAPTERS:
        raise PosttrainError(f"unknown preference-pair format {fmt!r} (use one of {', '.join(FORMATS)})")
    pair, prompt_chars = ADAPTERS[fmt](row, rid)
    if require_scores and (pair["score_chosen"] is None or pair["score_rejected"] is None):
        raise PairError(MISSING, "no 'score_chosen' / 'score_rejected' (reward-augmented training needs both)")
    if max_chars is not None:
        size = prompt_chars + max(len(pair["chosen"]), len(pair["rejected"]))
        if size > max_chars:
            raise PairError(TOO_LONG, f"prompt + longer completion is {size} characters, over max_chars={max_chars}")
    return pair


# ------------------------------------------------------------------- loading
def load_pairs(name: str, path: str, fmt: str, split: str, *, max_rows: int | None = None,
               skip_bad_rows: bool = True, max_chars: int | None = None,
               require_scores: bool = False) -> tuple[datasets.Dataset, PairReport]:
    """Load one split of preference pairs from a local file/directory or a hub id (as `datasets.py` does).

    Bad rows are skipped and counted in the report, or with skip_bad_rows=False the first one raises
    PosttrainError naming the dataset, its row number and the reason. max_rows stops once that many
    rows are kept; max_chars drops rows whose prompt + longer completion exceeds it (characters);
    require_scores drops rows without numeric score_chosen and score_rejected.
    """
    if fmt not in ADAPTERS:
        raise PosttrainError(f"data.{name}: unknown preference-pair format {fmt!r} (use one of {', '.join(FORMATS)})")
    if max_rows is not None and max_rows < 1:
        raise PosttrainError(f"data.{name}: max_rows must be >= 1, not {max_rows}")
    if max_chars is not None and max_chars < 1:
        raise PosttrainError(f"data.{name}: max_chars must be >= 1, not {max_chars}")
    rows = _load_rows(name, DatasetConfig(path=path), split)
    report = PairReport(name=name, split=split, fmt=fmt)
    kept: list[PairRow] = []
    for i, row in enumerate(rows):
        if max_rows is not None and len(kept) >= max_rows:
            break
        report.rows_read += 1
        row_number = row.get("_line", i + 1)
        rid = str(row.get("id") or f"{name}-{split}-{i:06d}")
        try:
            kept.append({**adapt_row(fmt, row, rid, max_chars, require_scores), "row": row_number})
        except PairError as exc:
            if not skip_bad_rows:
                raise PosttrainError(
                    f"data.{name} split {split!r}: row {row_number}: {REASONS[exc.reason]}: {exc} "
                    f"(format {fmt!r}; fix the row, or load with skip_bad_rows=True to skip and report such rows)"
                ) from None
            report.add_skip(exc.reason, row_number, str(exc))
    report.kept = len(kept)
    if report.skipped:
        log.warning("%s", report.summary())
    if not kept:
        firsts = "; ".join(report.first_error.values())
        raise PosttrainError(f"data.{name} split {split!r}: no usable rows (format {fmt!r}); {firsts}")
    return datasets.Dataset.from_list(list(kept)), report
