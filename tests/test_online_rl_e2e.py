"""Online RL end to end on a real local Ray with DeepSpeed learners and HF samplers: a GRPO run pushes versioned
weights and probes parity each step, a sampler that ignores a push stops the run on that step, PPO trains a critic
initialised from a reward model, a killed GRPO run resumes to the uninterrupted result, and DeepSpeed drops a
non-finite update."""

from __future__ import annotations

import json
import math
import sys

import pytest
import ray
import torch
from safetensors.torch import load_file

from cli_helpers import posttrain, run_and_kill, small_recipe, write
from posttrain.workers.sampler import SamplerWorker

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the samplers below travel to Ray workers by value


def _rl_recipe(tmp_path, model, kind="grpo", **stage) -> dict:
    recipe = small_recipe(tmp_path, model)
    recipe["data"]["arith"]["arithmetic"].update(n_pool=64)
    recipe["cluster"]["sampler"]["actors"] = 2
    recipe["cluster"]["verifier"]["cpus"] = 0  # learners and samplers take turns on the 2 CPUs; checks are cheap
    recipe["tracking"]["report"] = True
    recipe["stages"] = [{"kind": kind, "data": "arith", "train_split": "pool", "eval_split": "test",
                         "eval_problems": 8, "eval_every": 2, "steps": 2, "prompts_per_step": 4,
                         "samples_per_prompt": 4, "micro_batch_size": 4, "max_prompt_length": 16,
                         "sampling": {"temperature": 1.0, "max_new_tokens": 12},
                         "optim": {"lr": 1e-3, "schedule": "constant"}, "save_every": 1, **stage}]
    return recipe


def _metrics(run, stage="grpo"):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["stage"] == stage]


def test_grpo_run_syncs_verified_weights_and_a_killed_run_resumes_to_the_same_result(tmp_path, tiny_model):
    # The random model solves nothing; the no-EOS penalty makes rewards differ within groups, so the policy moves.
    path = write(tmp_path, _rl_recipe(tmp_path, tiny_model, steps=2, eval_every=2, reward={"no_eos_penalty": -1.0}))
    res = posttrain("run", str(path), "name=straight")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "straight"
    steps = [m for m in _metrics(run) if "step_s" in m]
    assert [m["weights_version"] for m in steps] == [1, 2]
    for m in steps:  # the probe ran after each push (and before the first update) and found the same log-probs
        assert m["parity/max_abs_diff"] < 1e-4 and m["skipped_updates"] == 0 and m["updates"] == 1
        assert m["zero_advantage_frac"] < 1 and -1 <= m["reward_mean"] <= 0
        assert m["kl"] >= 0 and m["entropy"] > 0 and m["log_z"] > 0 and m["is_ratio_max"] == pytest.approx(1, abs=1e-3)
    assert steps[-1]["kl"] > 0  # the policy moved away from the reference
    assert [m["step"] for m in _metrics(run) if "eval_pass@1" in m] == [0, 2]  # before training and at the end
    final = run / "grpo" / "checkpoints" / "step-000002"
    assert (final / "rl_state.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)  # a plain Hugging Face checkpoint
    assert "eval_pass@1" in (run / "report.html").read_text()

    ckpts = tmp_path / "runs" / "killed" / "grpo" / "checkpoints"
    run_and_kill(path, "killed", ckpts / "step-000001" / "trainer_state.json")
    res = posttrain("run", str(path), "name=killed", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    a, b = load_file(final / "model.safetensors"), load_file(ckpts / "step-000002" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    resumed = [m for m in _metrics(tmp_path / "runs" / "killed") if "step_s" in m]
    assert resumed[-1]["reward_mean"] == steps[-1]["reward_mean"]  # the last step sampled the same completions
    assert resumed[-1]["parity/max_abs_diff"] < 1e-4  # the resumed samplers serve the checkpoint's weights


class VersionOnlySampler(SamplerWorker):
    """Reports the new version but keeps serving the old weights: only the parity probe can tell."""

    def update_weights(self, state, version):
        self.version = version
        return version


class DeafSampler(SamplerWorker):
    """Ignores the push entirely: still serves (and reports) the old version."""

    def update_weights(self, state, version):
        return self.version


def test_a_sampler_that_ignores_a_weight_update_stops_the_run(tmp_path, tiny_model, monkeypatch):
    from posttrain import pipeline
    from posttrain.errors import PosttrainError
    from posttrain.recipe.load import load_recipe
    from posttrain.workers import sampler

    monkeypatch.setitem(sampler.SAMPLER_BACKENDS, "hf", VersionOnlySampler)
    recipe = load_recipe(write(tmp_path, _rl_recipe(tmp_path, tiny_model, eval_split=None, steps=3,
                                                    reward={"no_eos_penalty": -1.0})))  # so the weights do move
    with pytest.raises(PosttrainError, match=r"weights version 1: sampler \d's log-probs of the probe sequence differ"):
        pipeline.run(recipe)
    # The first push is checked as soon as the samples of step 2 are back: no update used them. Step 1's
    # checkpoint holds the learner's own weights, which the push does not touch.
    run = tmp_path / "runs" / "t"
    assert [m["step"] for m in _metrics(run) if "step_s" in m] == [1]
    ckpts = sorted((run / "grpo" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000001"]


def test_ppo_ptx_trains_a_critic_initialised_from_the_reward_model(tmp_path, tiny_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_model).pad_token_id
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(rm_dir)
    recipe = _rl_recipe(tmp_path, tiny_model, kind="ppo", eval_split=None,
                        reward={"source": "reward_model", "reward_model": str(rm_dir)},
                        ppo={"kl_coef": 0.05, "ptx_coef": 0.5}, critic={"optim": {"lr": 1e-3}},
                        ptx={"data": "arith", "split": "sft", "batch_size": 4})  # PPO-ptx on the SFT rows
    recipe["cluster"]["reward_model"] = {"actors": 1, "cpus": 0}
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    steps = [m for m in _metrics(run, "ppo") if "step_s" in m]
    assert len(steps) == 2 and all(m["value_loss"] > 0 and m["parity/max_abs_diff"] < 1e-4 for m in steps)
    assert all(0 < m["ptx_nll"] < 2 * math.log(128) for m in steps)  # the ptx term ran on every update
    first = steps[0]
    assert first["clip_frac"] == 0 and first["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # one epoch: ratio 1
    ckpt = run / "ppo" / "checkpoints" / "step-000002"
    critic = load_file(ckpt / "critic" / "model.safetensors")
    start = load_file(rm_dir / "model.safetensors")
    moved = (critic["score.weight"] - start["score.weight"]).abs().max().item()
    assert 0 < moved <= 2 * 1e-3 * 1.05  # trained, and within two Adam steps (|update| <= lr) of the RM's own head
    state = json.loads((ckpt / "rl_state.json").read_text())
    assert state["reward_stats"]["count"] == 2 * 4 * 4  # PPO-max's running statistics saw every score


def test_deepspeed_drops_a_non_finite_update_and_a_deaf_sampler_stops_the_push(tiny_model):
    """ZeRO-2 on two gloo ranks: a NaN advantage makes the gradient non-finite; the step is not applied anywhere.
    Then the push of the new weights to a sampler that ignores it fails on the spot."""
    from posttrain.algorithms.rl_objective import RLObjective
    from posttrain.cluster import Demand, gather, spawn
    from posttrain.data.batching import RLSample, collate_rl
    from posttrain.loops.online_rl import Actors, _check_push, _push_weights
    from posttrain.models.weights import WeightSyncError
    from posttrain.pipeline import _worker_env
    from posttrain.recipe.schema import OptimConfig
    from posttrain.workers.learner import LearnerSpec, LearnerWorker

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": _worker_env()}, logging_level="WARNING")
    try:
        spec = LearnerSpec(model_path=str(tiny_model), dtype="float32", lora=None, optim=OptimConfig(lr=1e-2),
                           total_steps=4, micro_batches_per_step=1, micro_batch_size=2, zero_stage=2, seed=0)
        with spawn(LearnerWorker, Demand("learner", 2, 1.0, 0.0), [(r, 2, spec) for r in range(2)], pack=True) as group:
            addr, port = ray.get(group[0].address.remote())
            gather([a.setup.remote(addr, port) for a in group])
            prompt, completion = [1, 10, 11], [12, 13, 2]
            lp = ray.get(group[0].probe.remote(prompt, completion))
            gather([a.probe.remote(prompt, completion) for a in group[1:]])

            def step(i, adv):
                batch = collate_rl([RLSample(prompt, completion, lp, advantages=[adv] * 3)] * 2, 0, None)
                totals = {"seqs": 4.0, "tokens": 12.0}
                return gather([a.rl_step.remote(i, [batch], totals, RLObjective("grpo")) for a in group])

            before = gather([a.policy_state.remote() for a in group])[0]
            assert [o["applied"] for o in step(0, float("nan"))] == [0.0, 0.0]
            after = gather([a.policy_state.remote() for a in group])[0]
            assert all(torch.equal(before[k], after[k]) for k in before)
            assert [o["applied"] for o in step(1, 1.0)] == [1.0, 1.0]  # and training goes on
            moved = gather([a.policy_state.remote() for a in group])[0]
            assert not all(torch.equal(before[k], moved[k]) for k in before)
            # A sampler that ignores the push keeps reporting its old version: the push itself refuses to go on.
            with spawn(DeafSampler, Demand("sampler", 1, 0.0, 0.0), [(str(tiny_model),)]) as deaf:
                with pytest.raises(WeightSyncError, match=r"weights version 1: the samplers report versions \[0\]"):
                    _check_push(_push_weights(Actors(group, [], deaf, [], []), 1), tolerance=1e-3)
    finally:
        ray.shutdown()
