"""LearnerWorker on a real local Ray with DeepSpeed on gloo: ZeRO equivalence, LoRA, checkpoints."""

from __future__ import annotations

import pytest
import torch

from posttrain.cluster import Demand, spawn
from posttrain.algorithms.sft import completion_nll
from posttrain.data.batching import collate, encode_example, shard_step, step_indices
from posttrain.data.tasks.arithmetic import ArithmeticConfig, build_splits
from posttrain.recipe.schema import LoraConfig, OptimConfig
from posttrain.workers.learner import LearnerSpec, LearnerWorker

pytestmark = pytest.mark.slow

GLOBAL_BATCH, MICRO = 8, 2


def _examples(tok, n=40):
    rows = build_splits(ArithmeticConfig(n_sft=n, n_pool=0, n_test=0))["sft"]
    return [encode_example(tok, r, 64)[0] for r in rows]


def _group(model, world, zero_stage=2, backend="deepspeed", lora=None, steps=3):
    spec = LearnerSpec(model_path=str(model), dtype="float32", lora=lora, optim=OptimConfig(lr=3e-3, warmup_steps=0),
                       total_steps=steps, micro_batches_per_step=GLOBAL_BATCH // (world * MICRO), micro_batch_size=MICRO,
                       backend=backend, zero_stage=zero_stage, seed=0, threads=1)
    group = spawn(LearnerWorker, Demand("learner", world, 1.0, 0.0), [(r, world, spec) for r in range(world)], pack=True)
    import ray

    addr, port = ray.get(group.actors[0].address.remote())
    ray.get([a.setup.remote(addr, port) for a in group.actors])
    return group


def _train(group, examples, pad_id, steps, world, start=0):
    import ray

    losses = []
    for step in range(start, start + steps):
        batch = [examples[i] for i in step_indices(len(examples), GLOBAL_BATCH, step, seed=0)]
        shards = shard_step(batch, world, MICRO, pad_id)
        tokens = sum(mb.n_target_tokens for r in shards for mb in r)
        outs = ray.get([a.train_step.remote(step, shards[r], tokens) for r, a in enumerate(group.actors)])
        losses.append(sum(o["nll_sum"] for o in outs) / tokens)
    return losses


@pytest.fixture(scope="module")
def tok(tiny_model):
    from posttrain.models.load import load_tokenizer

    return load_tokenizer(tiny_model)


def test_loss_falls_and_zero2_zero3_match_single_actor(ray_local, tiny_model, tok):
    examples = _examples(tok)
    runs = {}
    for name, world, stage in (("1 actor ZeRO-0", 1, 0), ("2 actors ZeRO-2", 2, 2), ("2 actors ZeRO-3", 2, 3)):
        group = _group(tiny_model, world, stage, steps=6)
        with group:
            runs[name] = _train(group, examples, tok.pad_token_id, 6, world)
    ref = runs["1 actor ZeRO-0"]
    assert ref[-1] < ref[0] * 0.8, f"loss did not fall: {ref}"
    for name, losses in runs.items():
        assert losses == pytest.approx(ref, abs=1e-5), f"{name}: {losses} vs {ref}"


def test_torch_backend_matches_deepspeed(ray_local, tiny_model, tok):
    examples = _examples(tok)
    group = _group(tiny_model, 1, backend="torch")
    with group:
        torch_losses = _train(group, examples, tok.pad_token_id, 3, 1)
    group = _group(tiny_model, 1, zero_stage=0)
    with group:
        ds_losses = _train(group, examples, tok.pad_token_id, 3, 1)
    assert torch_losses == pytest.approx(ds_losses, abs=1e-5)


def test_lora_trains_only_adapters_and_adapter_reloads_with_peft(ray_local, tiny_model, tok, tmp_path):
    import ray
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    group = _group(tiny_model, 2, 2, lora=lora)
    with group as actors:
        _train(group, _examples(tok), tok.pad_token_id, 3, 2)
        ray.get([a.save.remote(str(tmp_path / "ckpt")) for a in actors])
    saved = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:5]
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()  # only the adapter is written
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at 0: it trained

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, tmp_path / "ckpt")
    merged = model.merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed


def test_checkpoint_round_trip_and_resume_continue_exactly(ray_local, tiny_model, tok, tmp_path):
    import ray
    from transformers import AutoModelForCausalLM

    examples = _examples(tok)
    group = _group(tiny_model, 2, 2, steps=6)
    with group as actors:
        first = _train(group, examples, tok.pad_token_id, 3, 2)
        ray.get([a.save.remote(str(tmp_path / "ckpt")) for a in actors])
        probe = collate(examples[:4], tok.pad_token_id)
        learner_nll, learner_n = ray.get(actors[0].eval_loss.remote([probe]))
        uninterrupted = _train(group, examples, tok.pad_token_id, 3, 2, start=3)

    # The HF files hold the learner's weights: reload with transformers and compare a forward pass.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        nll, n = completion_nll(reloaded(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits,
                                probe.input_ids, probe.loss_mask)
    assert n.item() == learner_n and nll.item() == pytest.approx(learner_nll, rel=1e-5)

    group = _group(tiny_model, 2, 2, steps=6)
    with group as actors:
        ray.get([a.load.remote(str(tmp_path / "ckpt")) for a in actors])
        resumed = _train(group, examples, tok.pad_token_id, 3, 2, start=3)
    assert resumed == pytest.approx(uninterrupted, abs=1e-6)
    assert first[-1] > resumed[-1]
