"""GPU planning (posttrain/memory.py): ZeRO model states, activations, placement and the --dry-run refusal.

Every expected figure below is worked out by hand from the formulas, not by calling the code under test:
ZeRO paper (Rajbhandari et al. 2020): 2Ψ params + 2Ψ grads + 12Ψ Adam in mixed precision; stage 1 divides the
optimizer states by N_d, stage 2 also the grads, stage 3 also the params. Activations (Korthikanti et al. 2022,
without the attention scores that SDPA does not store): 34·s·b·h bytes per layer in 16-bit; logits s·b·V·4 bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_helpers import posttrain, small_recipe, write
from posttrain.errors import PosttrainError
from posttrain.memory import (activation_bytes, learner_need, lora_params, model_states, read_shape, resource_lines,
                              shape_from_config, train_shape)
from posttrain.recipe.load import RecipeError, load_recipe

GiB = 2**30

# A 7B Llama-style decoder (Llama-2-7B's shapes), as config.json only: no weights, no network.
h, L, a, i, V = 4096, 32, 32, 11008, 32000
LLAMA_7B = {"model_type": "llama", "hidden_size": h, "num_hidden_layers": L, "num_attention_heads": a,
            "num_key_value_heads": a, "intermediate_size": i, "vocab_size": V, "tie_word_embeddings": False,
            "hidden_act": "silu"}
# Ψ by the standard count: input embeddings V·h; per layer q, k, v, o (4·h·h), gate, up, down (3·h·i) and two
# RMSNorm weights (2·h); the final norm (h); the untied output matrix (V·h).
PSI = V * h + L * (4 * h * h + 3 * h * i + 2 * h) + h + V * h
assert PSI == 6_738_415_616  # 6.74B, Llama-2-7B's published count

N_D = 8  # 8 learners, one A100 40GB each
GPU = 40 * GiB
S, B = 1024, 4  # DPO: max_length 1024, micro_batch_size 2 pairs = 4 sequences per forward

ACTIVATIONS = 34 * S * B * h * L  # 18,253,611,008 B = 17.0 GiB
LOGITS = S * B * V * 4  # 524,288,000 B = 0.49 GiB


@pytest.fixture
def llama7b(tmp_path: Path) -> Path:
    d = tmp_path / "llama-7b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_7B))
    return d


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    d = tmp_path / "pairs"
    d.mkdir()
    rows = [{"prompt": f"Q{n}?", "chosen": " yes", "rejected": " no"} for n in range(4)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def dpo_recipe(tmp: Path, model: Path, data: Path, zero_stage: int, reference: str, micro_batch_size: int = 2,
               lora: dict | None = None) -> dict:
    return {
        "name": "plan7b",
        "model": {"path": str(model), "dtype": "bfloat16", **({"lora": lora} if lora else {})},
        "data": {"hh": {"path": str(data), "format": "pairs"}},
        "cluster": {"address": "auto", "nodes": 1, "gpus_per_node": 8, "gpu_memory_gb": 40,
                    "learner": {"actors": N_D, "cpus": 8, "gpus": 1, "zero_stage": zero_stage}},
        "tracking": {"output_dir": str(tmp / "runs")},
        "stages": [{"kind": "dpo", "data": "hh", "reference": reference, "batch_size": 64,
                    "micro_batch_size": micro_batch_size, "max_length": S}],
    }


def load(tmp: Path, recipe: dict):
    return load_recipe(write(tmp, recipe))


def parts_of(recipe) -> dict[str, int]:
    stage = recipe.stages[0]
    need = learner_need(recipe, read_shape(recipe.model.path), train_shape(stage))
    return dict(need.parts)


# ------------------------------------------------------------------------------------------- shapes
def test_params_come_from_config_json_by_the_standard_count(llama7b):
    shape = read_shape(str(llama7b))
    assert shape.params == PSI and shape.source == "config.json shapes"
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.vocab) == (L, h, a, a, 128, V)


def test_config_count_matches_the_weights_of_a_real_checkpoint(tiny_model):
    """The tiny Llama's safetensors headers give its exact Ψ (tied embeddings); the config formula must agree."""
    exact = read_shape(str(tiny_model))
    assert exact.source == "safetensors headers"
    assert shape_from_config(json.loads((tiny_model / "config.json").read_text())).params == exact.params


def test_unreadable_configs_skip_the_estimate_with_a_reason(tmp_path):
    recipe = load(tmp_path, dpo_recipe(tmp_path, Path("some-org/some-model"), tmp_path, 3, "precomputed"))
    lines = resource_lines(recipe, recipe.stages[0])
    assert lines[0].startswith("  placement: learner PACK 8 x {CPU 8, GPU 1} (one node)")
    assert lines[1] == ("  memory estimate skipped: 'some-org/some-model' is a hub id whose config.json is not in the "
                        "local Hugging Face cache (`hf download some-org/some-model config.json` fetches it)")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"n_embd": 768, "n_layer": 12}))
    recipe.model.path = str(tmp_path / "m")
    assert "memory estimate skipped: config.json has no hidden_size" in resource_lines(recipe, recipe.stages[0])[1]


# ------------------------------------------------------------------------------------------- model states
def test_zero_stages_partition_optimizer_then_grads_then_params():
    # Ψ = 1000 bf16 parameters over N_d = 4: 2000 B params, 2000 B grads, 12 x 1000 B Adam before partitioning.
    expected = {0: (2000, 2000, 12000), 1: (2000, 2000, 3000), 2: (2000, 500, 3000), 3: (500, 500, 3000)}
    for stage, (p, g, o) in expected.items():
        s = model_states(1000, 1000, "bfloat16", stage, 4)
        assert (s.params, s.grads, s.optimizer) == (p, g, o), stage
    s = model_states(1000, 1000, "float32", 0, 1)  # fp32: 4Ψ + 4Ψ + 8Ψ (no master copy; momentum, variance)
    assert (s.params, s.grads, s.optimizer) == (4000, 4000, 8000)
    s = model_states(1000, 1000, "bfloat16", 2, 4, backend="torch")  # plain AdamW: bf16 moments, nothing partitioned
    assert (s.params, s.grads, s.optimizer) == (2000, 2000, 4000)


def test_activations_follow_korthikanti():
    shape = shape_from_config(LLAMA_7B)
    assert activation_bytes(shape, S, B, "bfloat16") == ACTIVATIONS == 17 * GiB
    # eager attention also stores the scores: + 5·a·s²·b per layer
    assert activation_bytes(shape, S, B, "bfloat16", scores=True) == ACTIVATIONS + L * 5 * a * S * S * B
    assert activation_bytes(shape, S, B, "float32") == 2 * ACTIVATIONS


# ------------------------------------------------------------------------------------------- 7B on 8x A100 40GB
def test_zero2_full_fine_tune_with_a_live_reference_does_not_fit(tmp_path, llama7b, pairs):
    recipe = load(tmp_path, dpo_recipe(tmp_path, llama7b, pairs, zero_stage=2, reference="live"))
    parts = parts_of(recipe)
    assert parts == {
        "params": 2 * PSI,  # 13,476,831,232 B = 12.6 GiB: ZeRO-2 keeps every rank's 16-bit weights
        "grads": 2 * PSI // N_D,  # 1,684,603,904 B = 1.6 GiB
        "Adam": 12 * PSI // N_D,  # 10,107,623,424 B = 9.4 GiB
        "reference": 2 * PSI,  # a frozen bf16 copy on each learner: 12.6 GiB
        "activations": ACTIVATIONS,  # 17.0 GiB
        "logits": LOGITS,  # 0.5 GiB
    }
    total = sum(parts.values())
    assert total == 57_523_788_800  # 53.57 GiB
    assert total - GPU == 14_574_115_840  # 13.57 GiB over 40 GiB
    with pytest.raises(PosttrainError) as err:
        resource_lines(recipe, recipe.stages[0])
    assert str(err.value) == (
        "stage 'dpo': learner needs about 53.6 GiB per GPU (params 12.6 + grads 1.6 + Adam 9.4 + reference 12.6 + "
        "activations 17.0 + logits 0.5) but cluster.gpu_memory_gb is 40: 13.6 GiB over. Use reference: precomputed "
        "with zero_stage 3, LoRA, more learner actors (ZeRO partitions over N_d), a smaller micro_batch_size, "
        "or GPUs with more memory")


def test_zero3_with_a_precomputed_reference_fits(tmp_path, llama7b, pairs):
    recipe = load(tmp_path, dpo_recipe(tmp_path, llama7b, pairs, zero_stage=3, reference="precomputed"))
    parts = parts_of(recipe)
    assert parts == {"params": 2 * PSI // N_D, "grads": 2 * PSI // N_D, "Adam": 12 * PSI // N_D,
                     "activations": ACTIVATIONS, "logits": LOGITS}
    assert sum(parts.values()) == 32_254_730_240  # 30.04 GiB: 10 GiB to spare
    lines = resource_lines(recipe, recipe.stages[0])
    assert lines == [
        "  placement: learner PACK 8 x {CPU 8, GPU 1} (one node)",
        "  memory per learner GPU: params 1.6 + grads 1.6 + Adam 9.4 + activations 17.0 + logits 0.5 = 30.0 GiB of "
        "40 GiB (ZeRO-3 over N_d=8, bfloat16, 6.74B params from config.json shapes; s=1024 x b=4 per micro-batch)",
    ]


def test_lora_trains_only_the_adapters(tmp_path, llama7b, pairs):
    lora = {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    recipe = load(tmp_path, dpo_recipe(tmp_path, llama7b, pairs, zero_stage=2, reference="live", micro_batch_size=1,
                                       lora=lora))
    # Φ: each of the 4 adapted h -> h projections of each layer adds A (r x h) and B (h x r).
    phi = L * 16 * 4 * (h + h)
    assert phi == lora_params(read_shape(str(llama7b)), recipe.model.lora) == 16_777_216
    b = 2  # one pair
    parts = parts_of(recipe)
    assert parts == {
        "params": 2 * (PSI + phi),  # frozen bf16 base + adapters: 12.6 GiB
        "grads": 2 * phi // N_D,  # adapters only
        "Adam": 12 * phi // N_D,
        "reference": 2 * PSI,  # the learner loads a separate full copy
        "activations": 34 * S * b * h * L,  # 8.5 GiB: backward still runs through every frozen layer
        "logits": S * b * V * 4,
    }
    assert sum(parts.values()) == 36_405_526_528  # 33.9 GiB: fits in 40
    assert "= 33.9 GiB of 40 GiB" in resource_lines(recipe, recipe.stages[0])[1]


# ------------------------------------------------------------------------------------------- samplers, colocation
def grpo_recipe(tmp: Path, model: Path, colocate: bool, utilization: float = 0.85, learners: int = 8) -> dict:
    return {
        "name": "grpo7b",
        "model": {"path": str(model), "dtype": "bfloat16"},
        "data": {"arith": {"task": "arithmetic"}},
        "cluster": {"address": "auto", "nodes": 2, "gpus_per_node": 8, "gpu_memory_gb": 40,
                    "learner": {"actors": learners, "cpus": 8, "gpus": 1, "zero_stage": 2},
                    "sampler": {"actors": 8, "cpus": 4, "gpus": 1, "backend": "vllm",
                                "gpu_memory_utilization": utilization}},
        "tracking": {"output_dir": str(tmp / "runs")},
        "stages": [{"kind": "grpo", "data": "arith", "train_split": "sft", "prompts_per_step": 8, "samples_per_prompt": 2,
                    "micro_batch_size": 1, "max_prompt_length": 256, "sampling": {"max_new_tokens": 256},
                    "grpo": {"beta": 0.04}, "colocate": colocate}],
    }


# GRPO learner, s = 256 + 256, b = 1: 2Ψ + 2Ψ/8 + 12Ψ/8 + reference 2Ψ + 34·512·h·L + 512·V·4
GRPO_LEARNER = 2 * PSI + 2 * PSI // 8 + 12 * PSI // 8 + 2 * PSI + 34 * 512 * h * L + 512 * V * 4
assert GRPO_LEARNER == 41_093_127_168  # 38.3 GiB
VLLM = int(0.85 * 40 * GiB)  # 34.0 GiB: weights 2Ψ = 12.6, KV cache the other 21.4 GiB
KV_PER_TOKEN = 2 * L * a * 128 * 2  # K and V, every layer, 32 heads of 128, bf16: 524,288 B


def test_samplers_spread_and_vllm_keeps_the_rest_for_the_kv_cache(tmp_path, llama7b):
    recipe = load(tmp_path, grpo_recipe(tmp_path, llama7b, colocate=False))
    lines = resource_lines(recipe, recipe.stages[0])
    assert lines[0] == ("  placement: learner PACK 8 x {CPU 8, GPU 1} (one node); sampler SPREAD 8 x {CPU 4, GPU 1}; "
                        "verifier 1 x {CPU 0.5} (no group)")
    assert f"{(VLLM - 2 * PSI) // KV_PER_TOKEN:,}" == "43,926"
    assert lines[1].startswith("  memory per learner GPU: params 12.6 + grads 1.6 + Adam 9.4 + reference 12.6 + "
                               "activations 2.1 + logits 0.1 = 38.3 GiB of 40 GiB")
    assert lines[2] == ("  memory per sampler GPU: vLLM 0.85 x 40 GiB = 34.0 GiB of 40 GiB (weights 12.6, the KV cache "
                        "gets the rest: 21.4 GiB, ~43,926 tokens)")


def test_colocated_roles_add_up_on_one_gpu(tmp_path, llama7b):
    recipe = load(tmp_path, grpo_recipe(tmp_path, llama7b, colocate=True))
    assert GRPO_LEARNER + VLLM - GPU == 34_650_676_224  # 32.3 GiB over
    with pytest.raises(PosttrainError) as err:
        resource_lines(recipe, recipe.stages[0])
    assert str(err.value).startswith(
        "stage 'grpo': colocated learner + sampler need about 72.3 GiB on each shared GPU (learner 38.3 + sampler "
        "34.0) but cluster.gpu_memory_gb is 40: 32.3 GiB over. Use a lower cluster.sampler.gpu_memory_utilization, "
        "colocate: false")


def test_vllm_share_must_hold_the_weights(tmp_path, llama7b):
    recipe = load(tmp_path, grpo_recipe(tmp_path, llama7b, colocate=False, utilization=0.3))
    with pytest.raises(PosttrainError, match=r"stage 'grpo': sampler: vLLM gets gpu_memory_utilization 0.3 x "
                                             r"cluster.gpu_memory_gb 40 = 12.0 GiB, which cannot hold the weights "
                                             r"\(12.6 GiB\)"):
        resource_lines(recipe, recipe.stages[0])


def test_node_shape_limits_the_plan(tmp_path, llama7b):
    recipe = load(tmp_path, grpo_recipe(tmp_path, llama7b, colocate=False, learners=16))
    with pytest.raises(PosttrainError, match=r"needs 24 GPUs at once .* cluster.nodes x cluster.gpus_per_node = 16"):
        resource_lines(recipe, recipe.stages[0])
    recipe.cluster.nodes = 3
    assert "learner PACK 16 x {CPU 8, GPU 1} (spans 2 nodes" in resource_lines(recipe, recipe.stages[0])[0]


def test_cluster_fields_are_validated(tmp_path, llama7b):
    for bad, field in (({"gpu_memory_gb": 0}, "cluster.gpu_memory_gb"), ({"nodes": 2}, "cluster.nodes"),
                       ({"gpus_per_node": 0}, "cluster.gpus_per_node")):
        recipe = grpo_recipe(tmp_path, llama7b, colocate=False)
        recipe["cluster"] = {**{k: v for k, v in recipe["cluster"].items() if k not in ("nodes", "gpus_per_node")}, **bad}
        with pytest.raises(RecipeError) as err:
            load(tmp_path, recipe)
        assert any(issue.field == field for issue in err.value.issues), [str(x) for x in err.value.issues]


# ------------------------------------------------------------------------------------------- the CLI
def test_cpu_only_dry_run_is_unchanged(tmp_path, tiny_model):
    path = str(write(tmp_path, small_recipe(tmp_path, tiny_model)))
    before = posttrain("run", path, "--dry-run")
    after = posttrain("run", path, "--dry-run", "cluster.gpu_memory_gb=40", "cluster.nodes=1", "cluster.gpus_per_node=8")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert before.stdout == after.stdout
    assert "placement" not in before.stdout and "memory" not in before.stdout


def test_dry_run_prints_placement_and_memory_or_refuses(tmp_path, llama7b, pairs):
    fits = write(tmp_path, dpo_recipe(tmp_path, llama7b, pairs, zero_stage=3, reference="precomputed"), "fits.yaml")
    res = posttrain("run", str(fits), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "  placement: learner PACK 8 x {CPU 8, GPU 1} (one node)\n" in res.stdout
    assert "memory per learner GPU: params 1.6 + grads 1.6 + Adam 9.4 + activations 17.0 + logits 0.5 = 30.0 GiB" in res.stdout
    over = write(tmp_path, dpo_recipe(tmp_path, llama7b, pairs, zero_stage=2, reference="live"), "over.yaml")
    res = posttrain("run", str(over), "--dry-run")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "stage 'dpo': learner needs about 53.6 GiB per GPU" in res.stderr and "13.6 GiB over" in res.stderr


def test_plan_path_does_not_import_torch(llama7b, tmp_path, pairs):
    path = write(tmp_path, dpo_recipe(tmp_path, llama7b, pairs, zero_stage=3, reference="precomputed"))
    code = ("import sys; from posttrain.recipe.load import load_recipe; from posttrain import pipeline; "
            f"print(pipeline.plan(pipeline.absolute_paths(load_recipe({str(path)!r})))); "
            "assert 'torch' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_deepspeed_estimator_counts_an_extra_fp32_gradient_partition():
    """Cross-check with DeepSpeed's own ZeRO-2 estimator (run apart: importing deepspeed picks an accelerator).
    It charges 2Ψ + 18Ψ/N_d: the paper's 2Ψ + (2 + 12)Ψ/N_d plus a 4Ψ/N_d fp32 copy of the gradient partition."""
    pytest.importorskip("deepspeed")
    code = ("from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as e; "
            f"print(e({PSI}, {N_D}, 1, cpu_offload=False)[1])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ours = model_states(PSI, PSI, "bfloat16", 2, N_D)
    assert int(res.stdout.split()[-1]) - (ours.params + ours.grads + ours.optimizer) == 4 * PSI // N_D


def test_bundled_gpu_recipes_declare_their_gpus():
    for name, nodes in (("grpo_gsm8k.yaml", 1), ("ppo_rlhf.yaml", 2)):
        cluster = yaml.safe_load((Path(__file__).parents[1] / "recipes" / name).read_text())["cluster"]
        assert (cluster["gpu_memory_gb"], cluster["gpus_per_node"], cluster["nodes"]) == (40, 8, nodes)
