"""Atomic checkpoint directories."""

import json

from posttrain import checkpoint


def test_commit_renames_and_prunes(tmp_path):
    for step in (10, 20, 30):
        tmp = checkpoint.begin(tmp_path, step)
        (tmp / "weights").write_text(str(step))
        checkpoint.commit(tmp, {"step": step}, keep_last=2)
    assert [p.name for p in checkpoint.completed(tmp_path)] == ["step-000020", "step-000030"]
    path, state = checkpoint.latest(tmp_path)
    assert path.name == "step-000030" and state == {"step": 30}


def test_interrupted_save_is_invisible(tmp_path):
    tmp = checkpoint.begin(tmp_path, 10)
    checkpoint.commit(tmp, {"step": 10}, keep_last=3)
    half = checkpoint.begin(tmp_path, 20)  # a crash here leaves step-000020.tmp behind
    (half / "weights").write_text("partial")
    path, state = checkpoint.latest(tmp_path)
    assert path.name == "step-000010" and state["step"] == 10
    again = checkpoint.begin(tmp_path, 20)  # the retry starts clean
    assert not (again / "weights").exists()
    assert json.loads((checkpoint.commit(again, {"step": 20}, 3) / "trainer_state.json").read_text())["step"] == 20
