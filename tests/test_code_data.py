"""Code data: the synthetic functions task and the HumanEval / MBPP / stdio adapters through `datasets`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from posttrain.data.datasets import load_split
from posttrain.data.tasks.functions import FunctionsConfig, build_splits, describe, expression
from posttrain.recipe.schema import DatasetConfig
from posttrain.verifiers.code import CodePool, CodeTests, program_for

SHARED = Path(os.environ.get("POSTTRAIN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.mark.parametrize("start, steps, expected", [
    ("a", [("add", "3"), ("multiply by", "b")], "(a + 3) * b"),
    ("b", [("multiply by", "2"), ("add", "a")], "b * 2 + a"),
    ("a", [("subtract", "b"), ("subtract", "1"), ("multiply by", "a")], "(a - b - 1) * a"),
    ("a", [("multiply by", "b"), ("multiply by", "3")], "a * b * 3"),
    ("b", [("add", "1"), ("multiply by", "2"), ("add", "3"), ("multiply by", "4")], "((b + 1) * 2 + 3) * 4"),
])
def test_expression_follows_the_steps_left_to_right(start, steps, expected):
    assert expression(start, steps) == expected
    # the same value as doing the steps one at a time
    for a, b in [(2, 7), (-3, 5)]:
        acc = {"a": a, "b": b}[start]
        for name, operand in steps:
            x = {"a": a, "b": b}.get(operand) or int(operand)
            acc = {"add": acc + x, "subtract": acc - x, "multiply by": acc * x}[name]
        assert eval(expected, {}, {"a": a, "b": b}) == acc


def test_functions_splits_are_distinct_and_their_references_pass_in_the_sandbox():
    cfg = FunctionsConfig(max_steps=3, n_sft=40, n_pool=20, n_test=30, n_tests=4)
    splits = build_splits(cfg)
    prompts = [p for s in ("sft", "pool", "test") for p in splits[s]["prompt"]]
    assert len(prompts) == len(set(prompts)) == 90
    assert build_splits(FunctionsConfig(max_steps=3, n_sft=0, n_pool=0, n_test=30))["test"]["prompt"] == splits["test"]["prompt"]
    row = splits["sft"][0]
    assert row["prompt"].startswith("def f(a, b):\n    # take ") and row["prompt"].endswith("return")
    specs = [CodeTests.from_json(r["answer"]) for r in splits["test"]]
    assert all(len(t.tests) == 4 for t in specs)
    with CodePool(workers=2) as pool:
        right = pool.check_many([(program_for(c, t), t) for c, t in zip(splits["test"]["completion"], specs)])
        # the classic mistake: the steps written out without parentheses
        naive = [" " + r["prompt"].split("# take ")[1].split("\n")[0] for r in splits["test"]]
        naive = [s.replace(",", "").replace("add", "+").replace("subtract", "-").replace("multiply by", "*") for s in naive]
        wrong = pool.check_many([(program_for(n, t), t) for n, t in zip(naive, specs)])
    assert all(r.passed for r in right)
    needs_parens = [("(" in c) for c in splits["test"]["completion"]]
    assert any(needs_parens)
    for r, parens in zip(wrong, needs_parens):  # unparenthesised wrong code fails (barring lucky test inputs)
        if not parens:
            assert r.passed
    assert sum(not r.passed for r, p in zip(wrong, needs_parens) if p) >= 0.8 * sum(needs_parens)


def test_functions_config_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="distinct problems"):
        FunctionsConfig(max_steps=1, n_sft=100, n_pool=0, n_test=0)
    assert describe("a", [("add", "3")]) == "take a, add 3"


def test_code_formats_default_to_the_code_verifier():
    for fmt in ("humaneval", "mbpp", "stdio"):
        assert DatasetConfig(path="x", format=fmt).verifier == "code"
    assert DatasetConfig(task="functions").verifier == "code"


def test_stdio_rows_and_malformed_rows(tmp_path, caplog):
    rows = [
        {"question": "Add two numbers.", "inputs": ["1 2\n"], "outputs": ["3\n"], "solution": "print(sum(map(int, input().split())))"},
        {"question": "APPS style", "input_output": json.dumps({"inputs": ["5\n"], "outputs": ["25\n"]})},
        {"question": "lengths differ", "inputs": ["1"], "outputs": []},
        {"inputs": ["1"], "outputs": ["1"]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_split("apps", DatasetConfig(path=str(path), format="stdio"), "train")
    assert len(ds) == 2 and "skipped 2 malformed row(s)" in caplog.text
    tests = CodeTests.from_json(ds[1]["answer"])
    assert tests.cases == [("5\n", "25\n")] and ds[0]["completion"].startswith("print(")


def test_real_humaneval_and_mbpp_load_through_datasets():
    he, mbpp = SHARED / "humaneval" / "HumanEval.jsonl.gz", SHARED / "mbpp" / "mbpp.jsonl"
    if not he.exists() or not mbpp.exists():
        pytest.skip(f"no HumanEval/MBPP under {SHARED}")
    ds = load_split("he", DatasetConfig(path=str(he), format="humaneval"), "test")
    assert len(ds) == 164 and ds[0]["id"] == "HumanEval/0"
    t = CodeTests.from_json(ds[32]["answer"])
    assert t.entry == "find_zero" and "def poly" in t.context and t.tests[0]["code"].rstrip().endswith("check(candidate)")
    ds = load_split("mbpp", DatasetConfig(path=str(mbpp), format="mbpp"), "train")
    assert len(ds) == 974
    t = CodeTests.from_json(ds[0]["answer"])
    assert ds[0]["prompt"].startswith("You are an expert Python programmer") and t.tests[0]["code"] in ds[0]["prompt"]
    assert t.entry in ds[0]["completion"]
