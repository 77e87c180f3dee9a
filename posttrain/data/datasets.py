"""Datasets: built-in tasks or rows loaded with Hugging Face `datasets`.

Every split is normalised to the columns the loops read:
  id (str), prompt (str), completion (str | None), answer (str | None)
A prompt is plain text; `messages` rows are rendered with the model's chat template
later, at tokenisation, so the same data works for any tokenizer.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import datasets

from posttrain.errors import PosttrainError
from posttrain.recipe.schema import DatasetConfig

log = logging.getLogger(__name__)

COLUMNS = ("id", "prompt", "completion", "answer", "messages")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_split(name: str, cfg: DatasetConfig, split: str) -> datasets.Dataset:
    """Load one split of the named dataset, normalised, with malformed rows dropped (and reported)."""
    if cfg.task is not None:
        splits = _task_splits(cfg)
        if split not in splits:
            raise PosttrainError(f"data.{name}: the {cfg.task} task has splits {sorted(splits)}, not {split!r}")
        ds = splits[split]
    else:
        ds = _load_rows(name, cfg, split)
        ds = _normalise(name, cfg, split, ds)
    if cfg.max_rows is not None and len(ds) > cfg.max_rows:
        ds = ds.select(range(cfg.max_rows))
    return ds


def _task_splits(cfg: DatasetConfig) -> datasets.DatasetDict:
    if cfg.task == "functions":
        from posttrain.data.tasks.functions import build_splits as build_functions

        return build_functions(cfg.functions)
    if cfg.task == "kv_recall":
        from posttrain.data.tasks.kv_recall import build_splits as build_kv_recall

        return build_kv_recall(cfg.kv_recall)
    from posttrain.data.tasks.arithmetic import build_splits

    return build_splits(cfg.arithmetic)


def _load_rows(name: str, cfg: DatasetConfig, split: str) -> Iterable[dict[str, Any]]:
    assert cfg.path is not None
    path = Path(cfg.path).expanduser()
    where = f"data.{name}.path ({cfg.path})"
    if split in cfg.splits:  # an explicit file for this split (others may still come from `path`)
        file = Path(cfg.splits[split]).expanduser()
        file = file if file.is_absolute() else path / file
        return _load_file(file, f"data.{name}.splits.{split} ({file})")
    if path.is_file():
        return _load_file(path, where)
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.name.split(".")[0] == split and _builder_for(p)]
        if not files:
            raise PosttrainError(
                f"{where}: no file for split {split!r} in {path} (expected e.g. {split}.jsonl or {split}.parquet; "
                f"or list files under `splits:`)"
            )
        return _load_file(files[0], where)
    if _looks_local(cfg.path):
        raise PosttrainError(f"{where}: no such file or directory: {path.resolve()}")
    try:  # a hub id
        return datasets.load_dataset(cfg.path, cfg.subset, split=split)
    except Exception as exc:  # the hub raises many types (connection, not found, offline)
        raise PosttrainError(
            f"{where}: could not load {cfg.path!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "With no network, download it elsewhere and point `path` at the local files."
        ) from None


def from_hub(cfg: DatasetConfig, split: str) -> bool:
    """Whether this split would be fetched from the Hugging Face hub (not a task or a local file)."""
    return cfg.path is not None and split not in cfg.splits and not _looks_local(cfg.path) \
        and not Path(cfg.path).expanduser().exists()


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in (*_FILE_BUILDERS, ".gz") or path.count("/") > 1


def _builder_for(file: Path) -> str | None:
    suffixes = [s for s in file.suffixes if s != ".gz"]
    return _FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def _load_file(file: Path, where: str) -> Iterable[dict[str, Any]]:
    if not file.exists():
        raise PosttrainError(f"{where}: no such file: {file.resolve()}")
    builder = _builder_for(file)
    if builder is None:
        raise PosttrainError(f"{where}: unsupported file type {file.name!r} (use .jsonl, .json, .parquet or .csv, optionally .gz)")
    if builder == "json":
        return _load_jsonl(file, where)
    try:
        return datasets.load_dataset(builder, data_files=str(file), split="train")
    except Exception as exc:
        raise PosttrainError(f"{where}: could not read {file}: {exc}") from None


def _load_jsonl(file: Path, where: str) -> list[dict[str, Any]]:
    """JSON lines, parsed row by row so one bad line is reported by number instead of failing the load."""
    import gzip

    opener = gzip.open if file.suffix == ".gz" else open
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    with opener(file, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if isinstance(row, dict):
                row["_line"] = lineno
                rows.append(row)
            else:
                bad.append(lineno)
    if bad:
        log.warning("%s: skipped %d line(s) that are not JSON objects: %s%s", file, len(bad), bad[:5], " ..." if len(bad) > 5 else "")
    if not rows:
        raise PosttrainError(f"{where}: {file} holds no JSON object rows")
    return rows  # plain dicts: rows of mixed types are checked one by one in _normalise, not by Arrow


def _normalise(name: str, cfg: DatasetConfig, split: str, rows: Iterable[dict[str, Any]]) -> datasets.Dataset:
    """Map rows to the canonical columns; drop malformed rows, naming them."""
    kept: list[dict[str, Any]] = []
    bad: list[str] = []
    for i, row in enumerate(rows):
        where = f"row {row.get('_line', i + 1)}"
        try:
            kept.append(_canonical_row(cfg, row, f"{name}-{split}-{i:06d}"))
        except ValueError as exc:
            bad.append(f"{where}: {exc}")
    if bad:
        log.warning("data.%s split %s: skipped %d malformed row(s); first: %s", name, split, len(bad), "; ".join(bad[:3]))
    if not kept:
        raise PosttrainError(f"data.{name} split {split!r}: no usable rows (format {cfg.format!r}); first problems: {'; '.join(bad[:3])}")
    return datasets.Dataset.from_list(kept)


GSM8K_TEMPLATE = "Solve the problem step by step. End with a line '#### <number>'.\n\nQuestion: {question}\nAnswer:"
MATH_TEMPLATE = "Solve the problem step by step. Put the final answer in \\boxed{{}}.\n\nProblem: {problem}\nSolution:"
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: 2+3=<<2+3=5>>5


def _benchmark_row(cfg: DatasetConfig, row: dict[str, Any], rid: str) -> dict[str, Any]:
    """GSM8K / MATH rows -> prompt (template filled in), completion (worked solution), answer (final)."""
    if cfg.format == "gsm8k":
        question, solution = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not isinstance(solution, str) or "####" not in solution:
            raise ValueError("a gsm8k row needs 'question' and an 'answer' ending in '#### <number>'")
        text = (cfg.prompt_template or GSM8K_TEMPLATE).format(question=question.strip())
        completion = " " + _CALCULATOR.sub("", solution).strip()
        answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    else:
        problem, solution = row.get("problem"), row.get("solution")
        if not isinstance(problem, str) or not isinstance(solution, str):
            raise ValueError("a math row needs 'problem' and 'solution'")
        from posttrain.verifiers.math import extract  # the boxed answer of the reference solution

        text = (cfg.prompt_template or MATH_TEMPLATE).format(problem=problem.strip())
        completion = " " + solution.strip()
        answer = row.get("answer") or extract(solution)
        if not answer:
            raise ValueError("no 'answer' field and no \\boxed{} answer in the solution")
    messages = json.dumps([{"role": "user", "content": text}]) if cfg.chat else None
    return {"id": rid, "prompt": text, "completion": completion, "answer": str(answer), "messages": messages}


def _canonical_row(cfg: DatasetConfig, row: dict[str, Any], default_id: str) -> dict[str, Any]:
    fmt = cfg.format
    rid = str(row.get("id") or row.get("task_id") or row.get("unique_id") or default_id)
    if fmt in ("gsm8k", "math"):
        return _benchmark_row(cfg, row, rid)
    if fmt in ("humaneval", "mbpp", "stdio"):
        from posttrain.data.tasks.code import CODE_FORMATS

        return CODE_FORMATS[fmt](row, rid, cfg.prompt_template)
    answer = row.get("answer")
    answer = None if answer is None else str(answer)
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("missing or non-string 'prompt'")
        if completion is not None and not isinstance(completion, str):
            raise ValueError("'completion' must be a string")
        return {"id": rid, "prompt": prompt, "completion": completion, "answer": answer, "messages": None}
    # Conversational rows: the history is rendered with the tokenizer's chat template at tokenisation.
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError("'messages' must be a non-empty list of {role, content} strings")
    completion = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
    history = messages[:-1] if completion is not None else messages
    if not history:
        raise ValueError("'messages' has no turn before the assistant's")
    return {"id": rid, "prompt": "", "completion": completion, "answer": answer,
            "messages": json.dumps(history)}
