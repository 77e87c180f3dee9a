"""Loading real files through `datasets`: formats, malformed rows, missing paths."""

import gzip
import json
import os
from pathlib import Path

import pytest

from posttrain.data.datasets import load_split
from posttrain.errors import PosttrainError
from posttrain.recipe.schema import DatasetConfig

SHARED = Path(os.environ.get("POSTTRAIN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_completion_jsonl_with_malformed_rows_skipped(tmp_path, caplog):
    f = _write_jsonl(tmp_path / "train.jsonl", [
        json.dumps({"prompt": "a", "completion": "b", "answer": 3}),
        "{not json",
        json.dumps({"completion": "no prompt"}),
        json.dumps({"prompt": "c", "completion": "d"}),
    ])
    ds = load_split("mine", DatasetConfig(path=str(f)), "train")
    assert ds["prompt"] == ["a", "c"] and ds["answer"] == ["3", None]
    assert "line" in caplog.text and "[2]" in caplog.text  # the unparsable line is named
    assert "row 3" in caplog.text  # the row without a prompt is named by its line


def test_directory_with_split_files_and_parquet(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "p1", "completion": "c1"}]).to_parquet(str(tmp_path / "test.parquet"))
    _write_jsonl(tmp_path / "train.jsonl", [json.dumps({"prompt": "p0", "completion": "c0"})])
    cfg = DatasetConfig(path=str(tmp_path))
    assert load_split("d", cfg, "train")["prompt"] == ["p0"]
    assert load_split("d", cfg, "test")["prompt"] == ["p1"]
    with pytest.raises(PosttrainError, match="no file for split 'valid'"):
        load_split("d", cfg, "valid")


def test_messages_format_gzip(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "assistant", "content": "alone"}]}]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    ds = load_split("chat", DatasetConfig(path=str(tmp_path / "train.jsonl.gz"), format="messages"), "train")
    assert len(ds) == 1 and ds["completion"] == ["yo"]
    assert json.loads(ds["messages"][0]) == [{"role": "user", "content": "hi"}]


def test_missing_path_and_unreachable_hub_id_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(PosttrainError, match=r"data.x.path .*no such file or directory"):
        load_split("x", DatasetConfig(path=str(tmp_path / "nope.jsonl")), "train")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PosttrainError, match="could not load 'someone/some-dataset' from the Hugging Face hub"):
        load_split("x", DatasetConfig(path="someone/some-dataset"), "train")


def test_arithmetic_task_splits_and_max_rows():
    from posttrain.data.tasks.arithmetic import ArithmeticConfig

    cfg = DatasetConfig(task="arithmetic", arithmetic=ArithmeticConfig(n_sft=20, n_pool=10, n_test=30), max_rows=25)
    assert len(load_split("a", cfg, "sft")) == 20 and len(load_split("a", cfg, "test")) == 25
    assert cfg.verifier == "arithmetic"
    with pytest.raises(PosttrainError, match="splits"):
        load_split("a", cfg, "train")


@pytest.mark.skipif(not (SHARED / "gsm8k" / "test.jsonl").exists(), reason="shared data not present")
def test_real_gsm8k_file_loads_as_question_rows():
    # GSM8K rows have question/answer, not prompt/completion: every row is reported malformed -> a clear error.
    with pytest.raises(PosttrainError, match="no usable rows"):
        load_split("gsm8k", DatasetConfig(path=str(SHARED / "gsm8k" / "test.jsonl")), "test")
