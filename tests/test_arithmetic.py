"""Synthetic arithmetic task: worked solutions, split construction and the answer verifier."""

from __future__ import annotations

import time

import pytest

from posttrain.data.tasks.arithmetic import (
    ArithmeticConfig,
    build_splits,
    extract_answer,
    format_prompt,
    format_solution,
    is_correct,
    solve,
)

SMALL = ArithmeticConfig(n_sft=50, n_pool=200, n_test=100)


@pytest.mark.parametrize(
    "operands, ops, steps, answer",
    [
        ([2, 9, 1, 4], "+--", "2+9=11;11-1=10;10-4=6;", 6),
        ([1, 5, 3], "-+", "1-5=-4;-4+3=-1;", -1),  # negative intermediate
        ([0, 7, 2], "--", "0-7=-7;-7-2=-9;", -9),
        ([3, 4, 2], "-*", "3-4=-1;-1*2=-2;", -2),  # left to right, not precedence (3-4*2 would be -5)
        ([9, 9], "*", "9*9=81;", 81),
    ],
)
def test_solve(operands, ops, steps, answer):
    assert solve(operands, ops) == (steps, answer)


def test_format_prompt_and_solution():
    assert format_prompt([2, 9, 1, 4], ["+", "-", "-"]) == "2+9-1-4="
    assert format_solution([2, 9, 1, 4], ["+", "-", "-"]) == "2+9=11;11-1=10;10-4=6;#6"
    assert format_solution([1, 5, 3], "-+") == "1-5=-4;-4+3=-1;#-1"


def test_arity_mismatch_raises():
    with pytest.raises(ValueError):
        solve([1, 2, 3], "+")
    with pytest.raises(ValueError):
        format_prompt([1], "")


def test_default_splits_sizes_columns_and_speed():
    start = time.perf_counter()
    ds = build_splits(ArithmeticConfig())
    assert time.perf_counter() - start < 1.0
    assert {name: len(split) for name, split in ds.items()} == {"sft": 500, "pool": 5000, "test": 1000}
    for split in ds.values():
        assert split.column_names == ["id", "prompt", "completion", "answer"]
    assert ds["test"][17]["id"] == "arith-test-000017"
    assert ds["pool"][0]["id"] == "arith-pool-000000"


def test_rows_are_self_consistent():
    ds = build_splits(SMALL)
    for split in ds.values():
        for row in split:
            assert row["prompt"].endswith("=") and len(row["prompt"]) == 2 * 4  # 4 digits, 3 ops, '='
            assert row["completion"].count(";") == 3  # one step per operation
            assert row["completion"].endswith(f"#{row['answer']}")
            assert is_correct(row["completion"], row["answer"])
            assert row["answer"] == str(eval(row["prompt"][:-1].replace("-", "+-")))  # +/- only: order-free


def test_problems_unique_across_all_splits():
    ds = build_splits(ArithmeticConfig())
    prompts = [p for split in ds.values() for p in split["prompt"]]
    assert len(prompts) == len(set(prompts)) == 6500


def test_deterministic_by_seed_and_seeds_differ():
    a, b = build_splits(SMALL), build_splits(SMALL)
    assert all(a[s].to_list() == b[s].to_list() for s in a)
    c = build_splits(ArithmeticConfig(n_sft=50, n_pool=200, n_test=100, seed=1))
    assert a["test"]["prompt"] != c["test"]["prompt"]
    assert a["sft"]["prompt"] != c["sft"]["prompt"]


def test_test_split_does_not_depend_on_other_sizes():
    base = build_splits(SMALL)["test"]["prompt"]
    bigger = build_splits(ArithmeticConfig(n_sft=300, n_pool=900, n_test=100))["test"]["prompt"]
    assert base == bigger


def test_exhaustive_small_space():
    cfg = ArithmeticConfig(n_operands=2, max_operand=1, ops="+", n_sft=1, n_pool=1, n_test=2)
    assert cfg.n_possible == 4
    ds = build_splits(cfg)
    assert sorted(p for s in ds.values() for p in s["prompt"]) == ["0+0=", "0+1=", "1+0=", "1+1="]


def test_zero_sized_split():
    ds = build_splits(ArithmeticConfig(n_sft=0, n_pool=0, n_test=3))
    assert len(ds["sft"]) == 0 and len(ds["pool"]) == 0 and len(ds["test"]) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_operands": 1}, "n_operands"),
        ({"max_operand": 0}, "max_operand"),
        ({"ops": ""}, "ops"),
        ({"ops": "+/"}, "ops"),
        ({"ops": "++"}, "ops"),
        ({"n_sft": -1}, "n_sft"),
        ({"n_test": -5}, "n_test"),
        ({"n_operands": 2, "max_operand": 1, "ops": "+", "n_sft": 3, "n_pool": 1, "n_test": 1}, "only 4 exist"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArithmeticConfig(**kwargs)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2+9=11;11-1=10;10-4=6;#6", "6"),
        ("#1;#2", "2"),  # the last '#' wins
        ("#6</s>", "6"),  # decoded eos right after the answer
        ("#6\n<|user|>\n", "6"),
        ("#-4;3+1=4", "-4"),
        ("# 7 8", "7"),
        ("#abc", "abc"),
        ("#+6", "+6"),
        ("no marker 6", None),
        ("", None),
        ("#", None),
        ("# \n", None),
        ("#6#", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("2+9=11;11-1=10;10-4=6;#6", "6", True),
        ("#-4", "-4", True),
        ("#06", "6", True),
        ("#+6", "6", True),
        ("#6</s>", "6", True),
        ("#4", "-4", False),
        ("#6x", "6", False),
        ("#6.0", "6", False),
        ("#1_0", "10", False),  # int() would accept this
        ("#\u0666", "6", False),  # Arabic-Indic six: int() would accept this too
        ("#abc", "6", False),
        ("6", "6", False),  # no '#': no answer
        ("", "6", False),
        ("#6", "abc", False),  # unparsable reference never raises
    ],
)
def test_is_correct(completion, answer, expected):
    assert is_correct(completion, answer) is expected


def test_step_verifier_rejects_lucky_answers_and_accepts_worked_solutions():
    from posttrain.verifiers import arithmetic_steps as v

    assert v.extract("2+9=11;11-1=10;10-4=6;#6") == "6"
    assert v.extract("1-5=-4;-4+3=-1;#-1") == "-1"
    assert v.extract("7-9=-1;-1+6=4;4+2=6;#6") is None  # two wrong steps cancel: right answer, wrong work
    assert v.extract("7-9=-2;-1+6=5;5+2=7;#7") is None  # steps do not chain
    assert v.extract("2+9=11;11-1=10;10-4=6;#7") is None  # answer is not the last result
    assert v.extract("2+9=11;#11") == "11"
    for junk in ("", "#6", "2+9=11", "2+9=11;;#11x", "a+b=c;#3"):
        assert v.extract(junk) is None
    assert v.equal("6", "+6") and not v.equal("6", "7")
