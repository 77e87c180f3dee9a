"""Reward-model stage end to end: Bradley-Terry training on pairs, held-out accuracy, a Hugging Face
checkpoint served by RewardModelWorker, and online DPO labelled by that reward model (with XPO)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import easy_arithmetic_sft, posttrain, write
from posttrain.loops.preference import ranked_pairs
from posttrain.loops.reward_model import hold_out


def test_ranked_pairs_best_against_worst_distinct_finished():
    # problem 0 scores: a 3, b 1, c 2, a(dup) 9, d 0 unfinished; problem 1: single sample; problem 2: tie
    prompt_index = [0, 0, 0, 0, 0, 1, 2, 2]
    texts = ["a", "b", "c", "a", "d", "x", "e", "f"]
    scores = [3.0, 1.0, 2.0, 9.0, 0.0, 5.0, 1.0, 1.0]
    finished = [True, True, True, True, False, True, True, True]
    assert ranked_pairs(prompt_index, texts, scores, finished, max_per_problem=1, min_margin=0.0) == [(0, 0, 1)]
    # a second pair would be c against c: a pair needs two different samples
    assert ranked_pairs(prompt_index, texts, scores, finished, max_per_problem=2, min_margin=0.0) == [(0, 0, 1)]
    assert ranked_pairs(prompt_index, texts, scores, finished, max_per_problem=1, min_margin=2.0) == []
    texts[3] = "a2"  # now distinct: the 9 is the best, the second pair is a (3) vs c (2)... vs b (1)
    assert ranked_pairs(prompt_index, texts, scores, finished, max_per_problem=2, min_margin=0.0) == [(0, 3, 1), (0, 0, 2)]


def test_hold_out_is_seeded_and_disjoint():
    items = list(range(40))
    train, held = hold_out(items, 0.1, seed=3)
    assert len(held) == 4 and sorted(train + held) == items
    assert hold_out(items, 0.1, seed=3) == (train, held) and hold_out(items, 0.0, seed=3) == (items, [])


def _style_pairs(path: Path) -> Path:
    """A learnable preference: the same answer, plain (chosen) or followed by ' ??' (rejected)."""
    rows = [{"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b} ??"} for a in range(8) for b in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _rm_stage(**kw) -> dict:
    return {"kind": "reward_model", "name": "rm", "data": "prefs", "eval_fraction": 0.25, "steps": 30, "batch_size": 8,
            "micro_batch_size": 2, "max_length": 32, "optim": {"lr": 3e-3, "warmup_steps": 0}, "log_every": 10,
            "eval_every": 30, "save_every": 30, **kw}


@pytest.mark.slow
def test_reward_model_stage_learns_held_out_preferences_and_serves_them(tmp_path, tiny_model, ray_local):
    recipe = easy_arithmetic_sft(tmp_path, tiny_model)
    recipe["data"]["prefs"] = {"path": str(_style_pairs(tmp_path / "prefs.jsonl")), "format": "pairs"}
    recipe["stages"] = [_rm_stage(log_every=1)]
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    stage = json.loads((run / "summary.json").read_text())["stages"][0]
    m = stage["metrics"]
    assert m["train_pairs"] == 48 and m["eval_pairs"] == 16  # 64 pairs, a quarter held out
    assert m["eval_accuracy"] >= 0.9, m
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in logged if r.get("stage") == "rm" and "train_loss" in r)
    assert first["train_loss"] == pytest.approx(0.6931, abs=0.05)  # the new head starts near 0: loss near log 2

    # A plain Hugging Face sequence-classification checkpoint; the worker scores the held-out style as trained.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.workers.reward_model import RewardModelWorker

    ckpt = stage["checkpoint"]
    hf = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_token_id
    worker = RewardModelWorker(ckpt, batch_size=3)
    rows = [{"prompt": "9+9="}, {"prompt": "9+9="}, {"prompt": "3+9="}, {"prompt": "3+9="}]
    scores = worker.score(rows, ["18", "18 ??", "12", "12 ??"])
    with torch.no_grad():  # independent: one sequence at a time, no padding, straight through transformers
        direct = [hf(torch.tensor([tok(r["prompt"] + y)["input_ids"] + [tok.eos_token_id]])).logits.item()
                  for r, y in zip(rows, ["18", "18 ??", "12", "12 ??"])]
    assert scores == pytest.approx(direct, abs=1e-4)
    assert scores[0] > scores[1] and scores[2] > scores[3]


@pytest.mark.slow
def test_online_dpo_labelled_by_a_reward_model_with_xpo(tmp_path, tiny_model):
    recipe = easy_arithmetic_sft(tmp_path, tiny_model)
    recipe["data"]["prefs"] = {"path": str(_style_pairs(tmp_path / "prefs.jsonl")), "format": "pairs"}
    recipe["stages"] += [
        _rm_stage(model=str(tiny_model), steps=10, eval_every=10, save_every=10),
        {"kind": "dpo", "data": "arith", "train_split": "sft", "steps": 2, "batch_size": 4, "micro_batch_size": 1,
         "max_length": 32, "optim": {"lr": 1e-3, "warmup_steps": 0}, "log_every": 1, "loss": {"name": "dpo"},
         "online": {"rounds": 1, "samples_per_problem": 4, "label": "reward_model", "reward_model": "@rm",
                    "xpo_alpha": 0.01, "sampling": {"temperature": 1.5, "max_new_tokens": 12}}},
    ]
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    stages = json.loads((run / "summary.json").read_text())["stages"]
    sft, rm, dpo = stages
    assert dpo["model"] == sft["checkpoint"]  # the reward model is not the next stage's policy
    samples = [json.loads(l) for l in (run / "dpo" / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 * 4 and all(isinstance(s["reward"], float) for s in samples)
    rounds = json.loads((run / "dpo" / "rounds.json").read_text())
    # every problem with two distinct finished samples and unequal scores gives one pair
    by_id: dict[str, dict[str, float]] = {}
    for s in samples:
        if s["finished"]:
            by_id.setdefault(s["id"], {})[s["completion"]] = s["reward"]
    expected = sum(1 for d in by_id.values() if len(d) >= 2 and max(d.values()) > min(d.values()))
    assert rounds[0]["pairs"] == rounds[0]["problems_with_pairs"] == expected
    assert rounds[0]["sample_reward_mean"] == pytest.approx(sum(s["reward"] for s in samples) / len(samples), rel=1e-6)
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if r.get("stage") == "dpo" and "round1/loss" in r]
    # step 1: policy == reference, so the DPO part is log 2 and the loss is log 2 + the XPO term
    assert steps[0]["round1/loss"] == pytest.approx(0.693147 + steps[0]["round1/xpo_term"], abs=1e-4)
    assert steps[0]["round1/xpo_term"] < 0  # alpha times a log-probability
