"""DPO stages: pair batching, verified pairs, exact reference log-probs on the learner, offline and online runs."""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import pytest
import torch

from cli_helpers import easy_arithmetic_sft, posttrain, small_recipe, write
from posttrain.data.batching import Example, PairExample, attach_mismatched, collate_pairs, pack, shard_pairs
from posttrain.loops.preference import verified_pairs

SHARED = Path(os.environ.get("POSTTRAIN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def test_verified_pairs_match_distinct_finished_good_and_bad():
    # problem 0: good a, good a (dup), bad b, bad c; problem 1: only good; problem 2: good d, bad e (unfinished)
    prompt_index = [0, 0, 0, 0, 1, 2, 2]
    texts = ["a", "a", "b", "c", "x", "d", "e"]
    correct = [True, True, False, False, True, True, False]
    finished = [True, True, True, True, True, True, False]
    assert verified_pairs(prompt_index, texts, correct, finished, max_per_problem=2) == [(0, 0, 2)]
    texts[1] = "a2"  # now two distinct good answers: two pairs
    assert verified_pairs(prompt_index, texts, correct, finished, max_per_problem=2) == [(0, 0, 2), (0, 1, 3)]
    assert verified_pairs(prompt_index, texts, correct, finished, max_per_problem=1) == [(0, 0, 2)]


def test_pair_batches_put_chosen_first_and_keep_reference_order():
    pairs = [PairExample(Example([1, 2, 3], 2), Example([1, 2, 4, 5], 2), -1.0, -2.0),
             PairExample(Example([6, 7], 1), Example([6, 8, 9, 9, 9], 1), -3.0, -4.0)]
    b = collate_pairs(pairs, pad_id=0)
    assert b.n_pairs == 2 and b.tokens.input_ids.shape == (4, 5)
    assert b.tokens.input_ids[:, :2].tolist() == [[1, 2], [6, 7], [1, 2], [6, 8]]
    assert b.ref_logps.tolist() == [-1.0, -3.0, -2.0, -4.0]
    # rejected of pair 0 ([1, 2 | 4, 5]): positions 1 and 2 predict its completion tokens 4 and 5
    assert b.tokens.logits_to_keep[2].tolist() == [False, True, True, False, False]
    assert b.tokens.target_ids.tolist() == [3, 7, 4, 5, 8, 9, 9, 9] and b.tokens.target_seq.tolist() == [0, 1, 2, 2, 3, 3, 3, 3]
    shards = shard_pairs(pairs * 2, world_size=2, micro_batch_size=1, pad_id=0)
    assert [len(r) for r in shards] == [2, 2] and all(mb.n_pairs == 1 for r in shards for mb in r)
    with pytest.raises(ValueError):
        shard_pairs(pairs, world_size=2, micro_batch_size=2, pad_id=0)


def test_kto_mismatched_sequences_pair_each_prompt_with_the_next_chosen_response():
    pairs = [PairExample(Example([1, 2, 3], 2), Example([1, 2, 4, 4], 2)),
             PairExample(Example([5, 6, 7, 7], 1), Example([5, 8], 1)),
             PairExample(Example([9, 10], 1), Example([9, 11], 1))]
    attach_mismatched(pairs, max_length=4)
    assert [(p.kl.input_ids, p.kl.n_prompt) for p in pairs] == [([1, 2, 6, 7], 2), ([5, 10], 1), ([9, 3], 1)]
    for p, refs in zip(pairs, ([-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0])):
        p.set_references(refs)
    b = collate_pairs(pairs, pad_id=0)
    assert b.n_pairs == 3 and b.tokens.n_seqs == 9
    assert b.ref_logps.tolist() == [-1.0, -4.0, -7.0, -2.0, -5.0, -8.0, -3.0, -6.0, -9.0]  # chosen, rejected, kl columns
    attach_mismatched(pairs, max_length=3)  # pair 0's kl response is cut to fit: [1, 2 | 6]
    assert pairs[0].kl.input_ids == [1, 2, 6]


def test_packing_lays_sequences_end_to_end_first_fit_decreasing():
    seqs = [Example([1, 2, 3], 2), Example([4, 5, 6, 7, 8], 1), Example([9, 10], 1), Example([11, 12, 13, 14], 3)]
    b = pack(seqs, pad_id=0, capacity=7)
    # by length 5, 4, 3, 2: [5-token | 2-token] fills row 0; the 4-token starts row 1 and the 3-token joins it
    assert b.input_ids.tolist() == [[4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 1, 2, 3]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    assert b.logits_to_keep.tolist() == [[1, 1, 1, 1, 0, 1, 0], [0, 0, 1, 0, 0, 1, 0]]
    assert b.target_ids.tolist() == [5, 6, 7, 8, 10, 14, 3] and b.target_seq.tolist() == [1, 1, 1, 1, 2, 3, 0]
    tail = pack(seqs[:2], pad_id=0, capacity=7)  # rows are as long as the fullest: row 1 ends in a pad segment
    assert tail.input_ids.tolist() == [[4, 5, 6, 7, 8], [1, 2, 3, 0, 0]]
    assert tail.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    with pytest.raises(ValueError, match="does not fit"):
        pack(seqs, pad_id=0, capacity=4)


def test_learner_reference_logps_and_first_step_loss_are_exact(ray_local, tiny_model):
    """sequence_logps equals an independent HF forward; the first DPO step (policy == reference) has loss log 2."""
    from transformers import AutoModelForCausalLM

    from posttrain.algorithms.dpo import DPOConfig
    from posttrain.cluster import Demand, gather, spawn
    from posttrain.recipe.schema import OptimConfig
    from posttrain.workers.learner import LearnerSpec, LearnerWorker

    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(4):
        prompt = torch.randint(4, 90, (5,), generator=g).tolist()
        pairs.append(PairExample(Example(prompt + torch.randint(4, 90, (4,), generator=g).tolist(), 5),
                                 Example(prompt + torch.randint(4, 90, (6,), generator=g).tolist(), 5)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    expected = []
    with torch.no_grad():
        for p in pairs:
            for ex in (p.chosen, p.rejected):
                logits = model(torch.tensor([ex.input_ids])).logits[0].log_softmax(-1)
                expected.append(sum(logits[t - 1, ex.input_ids[t]].item() for t in range(ex.n_prompt, len(ex.input_ids))))
    spec = LearnerSpec(model_path=str(tiny_model), dtype="float32", lora=None, optim=OptimConfig(lr=1e-3, warmup_steps=0),
                       total_steps=2, micro_batches_per_step=2, micro_batch_size=2, backend="torch")
    with spawn(LearnerWorker, Demand("learner", 1, 1, 0.0), [(0, 1, spec)]) as (lr,):
        (addr,) = gather([lr.address.remote()])
        gather([lr.setup.remote(*addr)])
        # Padded (a row per sequence) and packed (rows of 20 tokens: a 9- and an 11-token sequence share one).
        padded, packed = collate_pairs(pairs, pad_id=0), collate_pairs(pairs, pad_id=0, capacity=20)
        assert packed.tokens.input_ids.shape == (4, 20) and padded.tokens.input_ids.shape == (8, 11)
        got, got_packed = gather([lr.sequence_logps.remote([padded, packed])])[0]
        order = [0, 2, 4, 6, 1, 3, 5, 7]  # collate_pairs: chosen of every pair, then rejected
        assert got == pytest.approx([expected[i] for i in order], abs=1e-4)
        assert got_packed == pytest.approx(got, abs=1e-4)
        for i, p in enumerate(pairs):
            p.ref_chosen, p.ref_rejected = got[i], got[4 + i]
        shards = shard_pairs(pairs, 1, 2, 0)
        (out,) = gather([lr.preference_step.remote(0, shards[0], 4, "dpo", DPOConfig(beta=0.1))])
    assert out["loss_sum"] / out["pairs"] == pytest.approx(math.log(2), abs=1e-5)
    assert out["rewards/margin"] == pytest.approx(0.0, abs=1e-4)


def _random_pairs(seed: int, n: int = 4) -> list[PairExample]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(4, 90, (5,), generator=g).tolist()
        pairs.append(PairExample(Example(prompt + torch.randint(4, 90, (4,), generator=g).tolist(), 5),
                                 Example(prompt + torch.randint(4, 90, (6,), generator=g).tolist(), 5)))
    return pairs


def _dpo_losses(tiny_model, steps: int, reference: str, update=None) -> list[float]:
    """Per-step DPO losses of one learner on the same 4 pairs, with a precomputed or a live (maybe moving) reference."""
    from posttrain.algorithms.dpo import DPOConfig
    from posttrain.cluster import Demand, gather, spawn
    from posttrain.recipe.schema import OptimConfig
    from posttrain.workers.learner import LearnerSpec, LearnerWorker

    pairs = _random_pairs(1)
    spec = LearnerSpec(model_path=str(tiny_model), dtype="float32", lora=None, optim=OptimConfig(lr=3e-3, warmup_steps=0),
                       total_steps=steps, micro_batches_per_step=1, micro_batch_size=4, backend="torch",
                       live_reference=reference == "live", reference_update=update)
    losses = []
    with spawn(LearnerWorker, Demand("learner", 1, 1, 0.0), [(0, 1, spec)]) as (lr,):
        gather([lr.setup.remote("127.0.0.1", 0)])
        if reference == "precomputed":
            (logps,) = gather([lr.sequence_logps.remote([collate_pairs(pairs, 0, 32)])])[0]
            for i, p in enumerate(pairs):
                p.ref_chosen, p.ref_rejected = logps[i], logps[4 + i]
        for step in range(steps):
            (out,) = gather([lr.preference_step.remote(step, shard_pairs(pairs, 1, 4, 0, 32)[0], 4, "dpo",
                                                       DPOConfig(beta=0.1))])
            losses.append(out["loss_sum"] / out["pairs"])
    return losses


@pytest.mark.slow
def test_live_reference_equals_precomputed_and_tr_dpo_hard_update_resets_to_log2(ray_local, tiny_model):
    from posttrain.recipe.schema import ReferenceUpdateConfig

    precomputed = _dpo_losses(tiny_model, 4, "precomputed")
    live = _dpo_losses(tiny_model, 4, "live")
    assert live == pytest.approx(precomputed, abs=1e-6) and live[0] == pytest.approx(math.log(2), abs=1e-6)
    assert live[3] < live[0] - 1e-3  # it trains
    # TR-DPO with alpha = 0 never moves the reference: plain DPO
    assert _dpo_losses(tiny_model, 4, "live", ReferenceUpdateConfig("soft", 0.0, 1)) == pytest.approx(live, abs=1e-7)
    # a hard update after step 2 makes the reference the policy again: step 3's loss is exactly log 2 (sawtooth)
    hard = _dpo_losses(tiny_model, 4, "live", ReferenceUpdateConfig("hard", 0.6, 2))
    assert hard[:2] == pytest.approx(live[:2], abs=1e-7)
    assert hard[2] == pytest.approx(math.log(2), abs=1e-6) and abs(hard[1] - math.log(2)) > 1e-3
    soft = _dpo_losses(tiny_model, 4, "live", ReferenceUpdateConfig("soft", 0.5, 1))
    assert soft[0] == pytest.approx(math.log(2), abs=1e-6) and log2_gap(soft[1]) < log2_gap(live[1])


def log2_gap(loss: float) -> float:
    return abs(loss - math.log(2))


def _pairs_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"} for a in range(6) for b in range(6)]
    rows.append({"prompt": "1+1=", "chosen": "2", "rejected": "2"})  # identical: reported and skipped
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _dpo_recipe(tmp_path, tiny_model, data: dict, stage: dict) -> dict:
    recipe = small_recipe(tmp_path, tiny_model)
    recipe["data"] = data
    recipe["stages"] = [{"kind": "dpo", "train_split": "train", "steps": 4, "batch_size": 8, "micro_batch_size": 2,
                         "max_length": 64, "optim": {"lr": 1e-3, "warmup_steps": 0}, "log_every": 1, "save_every": 4,
                         **stage}]
    return recipe


OFFLINE_LOSSES = [("dpo", {"name": "dpo", "beta": 0.1}, math.log(2)),
                  ("kto", {"name": "kto", "beta": 0.1, "undesirable_weight": 1.5}, (1 + 1.5) / 4),
                  ("simpo", {"name": "simpo", "beta": 2.0, "gamma": 1.0}, None)]


@pytest.mark.slow
def test_offline_dpo_runs(tmp_path, tiny_model):
    """Three offline stages in one run (one Ray start), each from the same starting model with its own loss."""
    data = {"pairs": {"path": str(_pairs_file(tmp_path)), "format": "pairs"}}
    recipe = _dpo_recipe(tmp_path, tiny_model, data, {"data": "pairs"})
    template = recipe["stages"][0]
    recipe["stages"] = [{**template, "name": name, "model": str(tiny_model), "loss": loss}
                        for name, loss, _ in OFFLINE_LOSSES]
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("identical chosen/rejected: 1") == 3
    run = tmp_path / "runs" / "t"
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())["stages"]
    from transformers import AutoModelForCausalLM

    for (name, loss, first), stage in zip(OFFLINE_LOSSES, summary):
        steps = [m for m in logged if m.get("stage") == name and "loss" in m]
        assert [m["step"] for m in steps] == [1, 2, 3, 4], name
        reference = run / name / "reference_logps.json"
        if first is not None:  # the first step's policy is the reference: h = 0 (KTO: r = z0 = 0, lambda / 2 each)
            assert steps[0]["loss"] == pytest.approx(first, abs=1e-4), name
            saved = json.loads(reference.read_text())
            assert len(saved) == 36 and {len(r) for r in saved} == ({3} if loss["name"] == "kto" else {2})
        else:
            assert not reference.exists()  # SimPO needs no reference pass
        AutoModelForCausalLM.from_pretrained(stage["checkpoint"])


@pytest.mark.slow
def test_reward_augmented_dpo_trains_on_two_conditioned_pairs_per_scored_pair(tmp_path, tiny_model):
    rows = [{"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b + 1}", "score_chosen": 9,
             "score_rejected": 2} for a in range(4) for b in range(4)]
    rows.append({"prompt": "1+1=", "chosen": "2", "rejected": "3"})  # no scores: reported and skipped
    path = tmp_path / "scored.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = _dpo_recipe(tmp_path, tiny_model, {"scored": {"path": str(path), "format": "pairs"}},
                         {"data": "scored", "loss": {"name": "cdpo", "beta": 0.01, "label_smoothing": 0.3},
                          "reward_augmented": {"template": "score {score:g}: {prompt}"}})
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "missing or malformed fields: 1 (rows 17)" in res.stderr
    run = tmp_path / "runs" / "t"
    summary = json.loads((run / "summary.json").read_text())["stages"][0]
    assert summary["metrics"]["pairs"] == 32  # 16 scored pairs, each mirrored
    assert len(json.loads((run / "dpo" / "reference_logps.json").read_text())) == 32


@pytest.mark.slow
def test_tr_dpo_run_sawtooth_and_resume_restores_the_moved_reference(tmp_path, tiny_model):
    """Two DeepSpeed ranks, a live reference hard-updated every 2 steps; resuming from step 2 reproduces step 4."""
    import shutil

    from safetensors.torch import load_file

    data = {"pairs": {"path": str(_pairs_file(tmp_path)), "format": "pairs"}}
    recipe = _dpo_recipe(tmp_path, tiny_model, data, {
        "data": "pairs", "loss": {"name": "dpo", "beta": 0.1}, "reference": "live", "save_every": 2,
        "reference_update": {"mode": "hard", "tau": 2}, "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"}})
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in logged if m.get("stage") == "dpo" and "loss" in m]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and losses[2] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(losses[1] - math.log(2)) > 1e-4 and abs(losses[3] - math.log(2)) > 1e-4  # the sawtooth
    ckpts = run / "dpo" / "checkpoints"
    assert not (run / "dpo" / "reference_logps.json").exists()
    step2 = load_file(ckpts / "step-000002" / "model.safetensors")
    ref2 = load_file(ckpts / "step-000002" / "reference" / "model.safetensors")
    assert all(torch.equal(ref2[k], step2[k]) for k in step2)  # hard update after step 2: reference == policy

    # What a run killed after its step-2 checkpoint leaves behind, then --resume.
    final = load_file(ckpts / "step-000004" / "model.safetensors")
    shutil.rmtree(ckpts / "step-000004")
    summary = json.loads((run / "summary.json").read_text())
    summary["stages"][0]["status"] = "running"
    (run / "summary.json").write_text(json.dumps(summary))
    res = posttrain("run", str(tmp_path / "recipe.yaml"), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    again = load_file(ckpts / "step-000004" / "model.safetensors")
    for k in final:
        torch.testing.assert_close(again[k], final[k], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_offline_dpo_on_hh_rlhf(tmp_path, tiny_model):
    path = SHARED / "hh_rlhf_helpful_base" / "test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"no HH-RLHF data at {path}")
    data = {"hh": {"path": str(path), "format": "hh_rlhf", "max_rows": 400}}
    recipe = _dpo_recipe(tmp_path, tiny_model, data, {"data": "hh", "train_split": "test", "max_length": 256,
                                                       "loss": {"name": "dpo", "beta": 0.1}})
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "empty completion: 1 (rows 121)" in res.stderr and "longer than max_length=256" in res.stderr
    logged = [json.loads(l) for l in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in logged if m.get("stage") == "dpo" and "loss" in m)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.slow
def test_online_dpo_rounds_pair_verified_with_failed_samples(tmp_path, tiny_model):
    from posttrain.data.tasks.arithmetic import is_correct

    recipe = easy_arithmetic_sft(tmp_path, tiny_model)
    recipe["stages"] += [
        {"kind": "dpo", "data": "arith", "train_split": "sft", "steps": 3, "batch_size": 4, "micro_batch_size": 1,
         "max_length": 32, "optim": {"lr": 1e-3, "warmup_steps": 0}, "log_every": 1, "loss": {"name": "dpo"},
         "online": {"rounds": 2, "samples_per_problem": 8, "sampling": {"temperature": 1.5, "max_new_tokens": 20}}},
    ]
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    rounds = json.loads((run / "dpo" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2] and all(r["pairs"] >= 4 for r in rounds)
    samples = [json.loads(l) for l in (run / "dpo" / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 * 8
    assert all(s["correct"] == is_correct(s["completion"], s["reference"]) for s in samples)
    summary = json.loads((run / "summary.json").read_text())["stages"][1]
    assert summary["checkpoint"] == rounds[-1]["checkpoint"] and "round-2" in summary["checkpoint"]
