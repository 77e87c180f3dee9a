"""The vLLM sampler backend against a stand-in `vllm` module (vLLM needs a GPU; this checks our side of its API),
and the pre-flight check of the optional backend (posttrain/backends.py).

The stand-in copies the signatures and the behaviour our adapter relies on, as read in vllm-project/vllm sources
(main branch as stored, vLLM 0.11-0.30 era; no 0.30.0-tagged copy was available to read):
  vllm/entrypoints/llm.py      LLM(model, *, dtype, gpu_memory_utilization, seed, **EngineArgs fields);
                               generate(prompts, sampling_params=None, *, use_tqdm, lora_request, priority,
                               tokenization_kwargs);
                               collective_rpc(method, timeout=None, args=(), kwargs=None) -> list (one per worker);
                               reset_prefix_cache(reset_running_requests=False, reset_connector=False) -> bool;
                               sleep(level=1, mode="abort"); wake_up(tags=None); llm_engine.add_lora/remove_lora
  vllm/engine/arg_utils.py     EngineArgs fields: enable_lora, max_loras, max_lora_rank, enable_sleep_mode,
                               generation_config, logprobs_mode, worker_extension_cls
  vllm/sampling_params.py      keyword fields; temperature < 1e-5 is greedy and then n > 1 raises; top_k "0 (or -1)"
                               disables; max_tokens >= 1
  vllm/outputs.py, logprobs.py RequestOutput.outputs: CompletionOutput(index, text, token_ids, cumulative_logprob,
                               logprobs, finish_reason, stop_reason); Logprob(logprob, rank, decoded_token)
  vllm/v1/core/sched/utils.py  check_stop: EOS (kept in token_ids) -> "stop", before max_tokens -> "length"
  vllm/lora/request.py         LoRARequest(lora_name, lora_int_id, lora_path); lora_int_id must be > 0
  vllm/config/lora.py          max_lora_rank in (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from posttrain.backends import VLLM_PIN
from posttrain.errors import PosttrainError
from posttrain.models.weights import WeightSyncError
from posttrain.recipe.schema import SamplingConfig
from posttrain.workers import vllm_sampler as vs

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ARGS = {"enable_lora", "max_loras", "max_lora_rank", "enable_sleep_mode", "generation_config", "logprobs_mode",
               "worker_extension_cls"}  # the EngineArgs fields the adapter passes (a subset of the real ones)


# ---------------------------------------------------------------------------------------------- the stand-in


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True

    def __post_init__(self):
        if self.top_k < -1 or self.max_tokens is not None and self.max_tokens < 1 or not 0 < self.top_p <= 1:
            raise ValueError("invalid sampling parameters")
        if self.temperature < 1e-5:
            self.top_p, self.top_k = 1.0, 0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        assert self.lora_path, "lora_path cannot be empty"


class FakeVLLMModel(torch.nn.Module):
    """A vLLM model: parameters under vLLM's names, in the engine's dtype and device ("meta" stands for the GPU);
    load_weights(weights) -> the names it loaded, the contract vLLM's DefaultModelLoader checks."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(4, 12, bias=False, device="meta", dtype=torch.bfloat16)
        self.out = torch.nn.Linear(4, 4, bias=False, device="meta", dtype=torch.bfloat16)
        self.received: list[tuple[str, str, torch.dtype]] = []

    def load_weights(self, weights):
        names = {n for n, _ in self.named_parameters()}
        loaded = set()
        for name, t in weights:
            self.received.append((name, t.device.type, t.dtype))
            loaded |= {name} & names
        return loaded


class FakeGPUWorker:
    def __init__(self):
        self.model_runner = types.SimpleNamespace(model=FakeVLLMModel())
        self.model_config = types.SimpleNamespace(quantization=None)


class FakeEngine:
    def __init__(self):
        self.loras: dict[int, LoRARequest] = {}
        self.removed: list[int] = []

    def add_lora(self, lora_request: LoRARequest) -> bool:
        assert (Path(lora_request.lora_path) / "adapter_config.json").is_file()
        self.loras[lora_request.lora_int_id] = lora_request
        return True

    def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return self.loras.pop(lora_id, None) is not None


EOS = 2  # the tiny model's </s>


class FakeLLM:
    """Streams scripted token sequences (or a default rule) through vLLM's stop rules: EOS -> "stop", else
    max_tokens -> "length"; the n samples of a prompt are its first n scripted sequences."""

    instances: list[FakeLLM] = []

    def __init__(self, model: str, *, dtype: str = "auto", gpu_memory_utilization: float = 0.9, seed: int = 0,
                 **engine_args):
        if unknown := set(engine_args) - ENGINE_ARGS:
            raise TypeError(f"EngineArgs got unexpected arguments {unknown}")
        self.model, self.dtype, self.engine_args = model, dtype, engine_args
        self.llm_engine = FakeEngine()
        # vLLM adds worker_extension_cls to the worker's bases (resolved by qualified name in the worker process).
        module, _, name = engine_args["worker_extension_cls"].rpartition(".")
        self.worker = type("Worker", (getattr(importlib.import_module(module), name), FakeGPUWorker), {})()
        self.script: dict[tuple[int, ...], list[tuple[list[int], list[float]]]] = {}
        self.calls: list = []
        self.rpcs: list = []
        self.sleeping, self.prefix_resets = False, 0
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,
                 tokenization_kwargs=None):
        assert not self.sleeping, "generate on a sleeping engine"
        if lora_request is not None and not self.engine_args.get("enable_lora"):
            raise ValueError("LoRA is not enabled")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts)
        self.calls.append((prompts, params, lora_request))
        return [self._answer(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]

    def _answer(self, ids: list[int], sp: SamplingParams) -> RequestOutput:
        if sp.prompt_logprobs is not None:  # scoring: log p(token t | < t) = -t / 10, None at t = 0
            scored = [None] + [{tok: Logprob(-t / 10)} for t, tok in enumerate(ids) if t > 0]
            return RequestOutput("0", None, ids, scored, [], True)
        seqs = self.script.get(tuple(ids)) or [
            ([ids[-1] + j, EOS] if j % 2 == 0 else [7] * 99, [-0.5 * (k + 1) - 0.01 * j for k in range(99)])
            for j in range(sp.n)]
        outs = []
        for j, (tokens, lps) in enumerate(seqs[: sp.n]):
            kept, reason = [], "length"
            for t in tokens[: sp.max_tokens]:
                kept.append(t)
                if t == EOS:
                    reason = "stop"
                    break
            steps = [{t: Logprob(lp, rank=1)} for t, lp in zip(kept, lps)]
            outs.append(CompletionOutput(j, "", tuple(kept), sum(lps[: len(kept)]), steps, reason))
        return RequestOutput("0", None, ids, None, outs[::-1], True)  # any order: the adapter sorts by index

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.rpcs.append(method)
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False) -> bool:
        self.prefix_resets += 1
        return True

    def sleep(self, level: int = 1, mode: str = "abort"):
        assert self.engine_args.get("enable_sleep_mode"), "Sleep mode is not enabled"
        self.sleeping = True

    def wake_up(self, tags: list[str] | None = None):
        self.sleeping = False


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams, mod.__version__ = FakeLLM, SamplingParams, VLLM_PIN
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, m in (("vllm", mod), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, m)
    FakeLLM.instances = []
    return mod


@pytest.fixture(scope="module")
def hf_sampler(tiny_model):
    from posttrain.workers.sampler import SamplerWorker

    return SamplerWorker(str(tiny_model), threads=1, version=3)


def _adapter(tmp_path: Path, base: Path, name: str, r: int, rank_pattern: dict | None = None) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": r,
                                                       "rank_pattern": rank_pattern or {}}))
    return str(d)


# ---------------------------------------------------------------------------------------------- requests


def test_sampling_params_follow_the_sampling_config():
    kw = vs.sampling_kwargs(SamplingConfig(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=4), n=3, seed=11)
    assert kw == {"n": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "seed": 11, "max_tokens": 4, "logprobs": 0,
                  "detokenize": False}
    assert vs.sampling_kwargs(SamplingConfig(top_k=20), 2, 0)["top_k"] == 20
    SamplingParams(**kw)  # the stand-in's signature and checks accept it


def test_greedy_requests_one_sample_and_repeats_it():
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=5)
    with pytest.raises(ValueError, match="n must be 1"):  # why: vLLM refuses n > 1 when greedy
        SamplingParams(n=3, temperature=0.0)
    kw = vs.sampling_kwargs(cfg, n=3, seed=0)
    assert (kw["n"], kw["temperature"]) == (1, 0.0)
    assert vs.sampling_kwargs(SamplingConfig(temperature=1e-6), 3, 0)["n"] == 1  # vLLM's own greedy threshold


def test_request_seeds_are_stable_and_apart():
    seeds = [vs.request_seed(5, i) for i in range(2000)]
    assert seeds == [vs.request_seed(5, i) for i in range(2000)] and vs.request_seed(6, 0) != seeds[0]
    ordered = sorted(seeds)
    # vLLM seeds a request's n samples seed, seed+1, ...: no two prompts' ranges may overlap for any sane n
    assert min(b - a for a, b in zip(ordered, ordered[1:])) > 10_000 and max(seeds) < 2**56


# ---------------------------------------------------------------------------------------------- results


def _seq(index, ids, reason, lps=None):
    lps = lps or [-0.1 * (k + 1) for k in range(len(ids))]
    return CompletionOutput(index, "", tuple(ids), sum(lps), [{t: Logprob(lp)} for t, lp in zip(ids, lps)], reason)


def test_conversion_edge_cases():
    outputs = [RequestOutput("0", None, [5], None, [_seq(1, [9, 9, 9], "length"), _seq(0, [4, EOS], "stop")], True),
               RequestOutput("1", None, [6], None, [_seq(0, [8, 8, EOS], "stop"), _seq(1, [], "abort")], True)]
    roll = vs.to_rollouts(outputs, n=2, greedy=False, eos_id=EOS, version=4,
                          decode=lambda ids: [" ".join(map(str, x)) for x in ids])
    assert roll.prompt_index == [0, 0, 1, 1] and (roll.version, roll.n) == (4, 2)
    assert roll.completion_ids == [[4, EOS], [9, 9, 9], [8, 8, EOS], []]  # sorted by index; EOS kept
    assert roll.finished == [True, False, True, False]  # max_tokens ("length") and empty: not finished
    assert roll.logprobs == [[-0.1, -0.2], [-0.1, -0.2, -0.1 * 3], [-0.1, -0.2, -0.1 * 3], []]
    assert roll.text == ["4 2", "9 9 9", "8 8 2", ""]


def test_greedy_answer_is_repeated_and_bad_outputs_are_refused():
    outputs = [RequestOutput("0", None, [5], None, [_seq(0, [3, EOS], "stop")], True)]
    roll = vs.to_rollouts(outputs, n=3, greedy=True, eos_id=EOS, version=0, decode=lambda ids: [""] * len(ids))
    assert roll.completion_ids == [[3, EOS]] * 3 and roll.completion_ids[0] is not roll.completion_ids[1]
    with pytest.raises(RuntimeError, match="1 completions for prompt 0, expected 3"):
        vs.to_rollouts(outputs, n=3, greedy=False, eos_id=EOS, version=0, decode=list)
    outputs[0].outputs[0].logprobs = None
    with pytest.raises(RuntimeError, match="log-probs for 0 of 2"):
        vs.to_rollouts(outputs, n=1, greedy=True, eos_id=EOS, version=0, decode=list)


def test_rollouts_match_the_hf_backend_field_by_field(fake_vllm, tiny_model, hf_sampler):
    """The HF backend's samples, replayed through the stand-in engine, come back as the same Rollouts."""
    tok = hf_sampler.tokenizer
    prompts = [tok(t)["input_ids"] for t in ["1+2=", "9-9+9=", "4="]]
    cfg = SamplingConfig(temperature=1.0, top_k=0, max_new_tokens=4)
    for seed in range(30):  # a seed whose samples both end at EOS and run into max_new_tokens
        hf = hf_sampler.generate(prompts, n=4, params=cfg, batch_size=12, seed=seed)
        if any(hf.finished) and not all(hf.finished):
            break
    assert any(hf.finished) and not all(hf.finished)
    w = vs.VLLMSamplerWorker(str(tiny_model), version=3)
    llm = FakeLLM.instances[-1]
    for i, p in enumerate(prompts):
        rows = [r for r, pi in enumerate(hf.prompt_index) if pi == i]
        llm.script[tuple(p)] = [(hf.completion_ids[r] + [EOS, 5, 5], hf.logprobs[r] + [0.0] * 3) for r in rows]
    roll = w.generate(prompts, n=4, params=cfg, batch_size=12, seed=seed)
    for name in ("prompt_index", "completion_ids", "logprobs", "finished", "text", "version", "n"):
        assert getattr(roll, name) == getattr(hf, name), name


def test_generate_sends_token_prompts_with_a_seed_per_prompt(fake_vllm, tiny_model):
    w = vs.VLLMSamplerWorker(str(tiny_model), version=3)
    roll = w.generate([[10, 11], [20]], n=2, params=SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=4),
                      batch_size=99, seed=1)
    prompts, params, lora = FakeLLM.instances[-1].calls[-1]
    assert prompts == [{"prompt_token_ids": [10, 11]}, {"prompt_token_ids": [20]}] and lora is None
    assert [sp.seed for sp in params] == [vs.request_seed(1, 0), vs.request_seed(1, 1)]
    assert all((sp.n, sp.max_tokens, sp.logprobs, sp.detokenize) == (2, 4, 0, False) for sp in params)
    assert roll.completion_ids == [[11, EOS], [7, 7, 7, 7], [20, EOS], [7, 7, 7, 7]]
    assert roll.finished == [True, False, True, False] and roll.logprobs[0] == [-0.5, -1.0]


def test_engine_arguments(fake_vllm, tiny_model):
    vs.VLLMSamplerWorker(str(tiny_model), "bfloat16", 1, 0, 0.5)
    llm = FakeLLM.instances[-1]
    assert (llm.model, llm.dtype) == (str(tiny_model), "bfloat16")
    assert llm.engine_args == {"logprobs_mode": "raw_logprobs", "generation_config": "vllm", "enable_sleep_mode": False,
                               "worker_extension_cls": "posttrain.workers.vllm_sampler.WeightSyncExtension"}


def test_probe_reads_the_completion_tokens_prompt_logprobs(fake_vllm, tiny_model):
    w = vs.VLLMSamplerWorker(str(tiny_model), version=5)
    version, lps = w.probe([10, 11, 12], [13, 14])
    prompts, (sp,), _ = FakeLLM.instances[-1].calls[-1]
    assert prompts == [{"prompt_token_ids": [10, 11, 12, 13, 14]}] and (sp.prompt_logprobs, sp.max_tokens) == (0, 1)
    assert version == 5 and lps == [-0.3, -0.4]  # positions 3 and 4 of the scored sequence


# ---------------------------------------------------------------------------------------------- weights, versions


def _state(**skip):
    full = {"qkv.weight": torch.ones(12, 4), "out.weight": torch.ones(4, 4), "rotary.inv_freq": torch.arange(2)}
    return {k: v for k, v in full.items() if k not in skip}


def test_update_weights_in_place_on_the_engines_device_and_dtype(fake_vllm, tiny_model):
    w = vs.VLLMSamplerWorker(str(tiny_model), version=3)
    llm = FakeLLM.instances[-1]
    assert w.update_weights(_state(), 4) == 4 == w.version
    assert llm.rpcs == ["posttrain_load_weights"] and llm.prefix_resets == 1
    assert llm.worker.model_runner.model.received == [("qkv.weight", "meta", torch.bfloat16),
                                                      ("out.weight", "meta", torch.bfloat16),
                                                      ("rotary.inv_freq", "meta", torch.int64)]  # ints keep dtype


def test_stale_or_repeated_versions_are_refused_without_touching_the_engine(fake_vllm, tiny_model):
    w = vs.VLLMSamplerWorker(str(tiny_model), version=3)
    llm = FakeLLM.instances[-1]
    for stale in (3, 2):
        with pytest.raises(WeightSyncError, match=f"version {stale} refused: .* already serves version 3"):
            w.update_weights(_state(), stale)
    with pytest.raises(WeightSyncError, match="refused"):
        w.load_weights(str(tiny_model), 3)
    with pytest.raises(WeightSyncError, match="no tensors"):
        w.update_weights({}, 4)
    assert llm.rpcs == [] and w.version == 3 and len(FakeLLM.instances) == 1
    w.generate([[5]], 1, SamplingConfig(max_new_tokens=2), 1)  # still serving version 3


def test_a_failed_update_keeps_the_version_and_stops_sampling_until_a_good_one(fake_vllm, tiny_model):
    w = vs.VLLMSamplerWorker(str(tiny_model), version=3)
    with pytest.raises(WeightSyncError, match=r"left 1 of the sampler's parameters unloaded \(out.weight"):
        w.update_weights(_state(**{"out.weight": 1}), 4)
    assert w.version == 3
    for call in (lambda: w.generate([[5]], 1, SamplingConfig(), 1), lambda: w.probe([5], [6])):
        with pytest.raises(WeightSyncError, match="the update to weights version 4 failed part-way"):
            call()
    assert w.update_weights(_state(), 5) == 5
    assert w.generate([[5]], 1, SamplingConfig(max_new_tokens=2), 1).version == 5


def test_load_weights_restarts_the_engine_on_a_newer_checkpoint(fake_vllm, tiny_model):
    w = vs.VLLMSamplerWorker(str(tiny_model), version=0)
    assert w.load_weights(str(tiny_model), 2) == 2 and len(FakeLLM.instances) == 2


# ---------------------------------------------------------------------------------------------- LoRA adapters


def test_lora_rank_slots():
    assert [vs.lora_rank_slot(r) for r in (1, 2, 8, 9, 64, 300, 320, 321, 512)] == [1, 8, 8, 16, 64, 320, 320, 512, 512]
    with pytest.raises(PosttrainError, match="above vLLM's largest max_lora_rank"):
        vs.lora_rank_slot(513)


def test_adapter_sync_gives_every_version_a_new_lora_id(fake_vllm, tiny_model, tmp_path):
    a1 = _adapter(tmp_path, tiny_model, "a1", r=4, rank_pattern={"q_proj": 12})
    w = vs.VLLMSamplerWorker(a1, "bfloat16", 1, 1, 0.5, "adapter")
    llm = FakeLLM.instances[-1]
    assert llm.model == str(tiny_model)  # the engine runs the adapter's base
    assert {k: llm.engine_args[k] for k in ("enable_lora", "max_lora_rank", "max_loras")} == {
        "enable_lora": True, "max_lora_rank": 16, "max_loras": 1}  # rank 12 (rank_pattern) -> slot 16
    assert (w.lora.lora_int_id, w.lora.lora_path) == (1, a1) and set(llm.llm_engine.loras) == {1}
    # The learner rewrites the same directory each version: the same id would serve vLLM's cached copy.
    assert w.load_weights(a1, 2) == 2 and w.lora.lora_int_id == 2 and set(llm.llm_engine.loras) == {2}
    assert llm.llm_engine.removed == [1] and len(FakeLLM.instances) == 1  # swapped, no engine restart
    w.generate([[5]], 2, SamplingConfig(max_new_tokens=2), 1)
    w.probe([5], [6])
    assert [call[2].lora_int_id for call in llm.calls] == [2, 2]
    with pytest.raises(WeightSyncError, match="refused"):
        w.load_weights(a1, 2)
    with pytest.raises(WeightSyncError, match="push the adapter directory with load_weights"):
        w.update_weights(_state(), 3)
    assert w.lora.lora_int_id == 2 and w.version == 2


def test_adapter_sync_restarts_the_engine_for_a_larger_rank_and_starts_from_a_full_model(fake_vllm, tiny_model,
                                                                                        tmp_path):
    w = vs.VLLMSamplerWorker(str(tiny_model), "bfloat16", 1, 0, 0.5, "adapter", False, 8)
    assert FakeLLM.instances[-1].engine_args["max_lora_rank"] == 8 and w.lora is None  # base only: a fresh adapter
    w.load_weights(_adapter(tmp_path, tiny_model, "big", r=40), 1)
    assert len(FakeLLM.instances) == 2 and FakeLLM.instances[-1].engine_args["max_lora_rank"] == 64
    assert w.lora.lora_int_id == 1


# ---------------------------------------------------------------------------------------------- sleep / wake


def test_sleep_and_wake_up(fake_vllm, tiny_model):
    w = vs.VLLMSamplerWorker(str(tiny_model), "bfloat16", 1, 0, 0.3, "merged", True)
    llm = FakeLLM.instances[-1]
    assert llm.engine_args["enable_sleep_mode"] is True
    w.sleep()
    w.sleep()  # idempotent
    assert llm.sleeping and w.asleep
    for call in (lambda: w.generate([[5]], 1, SamplingConfig(), 1), lambda: w.probe([5], [6]),
                 lambda: w.update_weights(_state(), 1)):
        with pytest.raises(PosttrainError, match=r"asleep .* call wake_up\(\) first"):
            call()
    assert w.version == 0
    w.wake_up()
    w.wake_up()
    assert not llm.sleeping and llm.prefix_resets == 1
    assert w.update_weights(_state(), 1) == 1


def test_sleep_is_a_no_op_without_sleep_mode_and_on_the_hf_backend(fake_vllm, tiny_model, hf_sampler):
    w = vs.VLLMSamplerWorker(str(tiny_model))
    w.sleep()  # the stand-in, like vLLM, would fail if the engine were put to sleep without sleep mode
    assert not w.asleep
    w.generate([[5]], 1, SamplingConfig(max_new_tokens=2), 1)
    hf_sampler.sleep()
    hf_sampler.wake_up()


# ---------------------------------------------------------------------------------------------- optional extra


def test_missing_vllm_is_a_clear_error(monkeypatch, tiny_model):
    from posttrain.workers.sampler import VLLMSamplerWorker

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(PosttrainError, match=r"pip install 'posttrain\[vllm\]'"):
        VLLMSamplerWorker(str(tiny_model))


def _recipe(backend: str):
    from posttrain.recipe.load import load_recipe

    return load_recipe(ROOT / "recipes" / "grpo_gsm8k.yaml", [f"cluster.sampler.backend={backend}"])


def test_check_backends_refuses_a_run_without_vllm_and_only_notes_it_otherwise(monkeypatch):
    from posttrain import backends

    assert backends.installed_vllm() is None  # vLLM is not installed in this environment
    recipe = _recipe("vllm")  # the bundled GPU recipe still loads and validates here
    (note,) = backends.check_backends(recipe, strict=False)
    assert "cluster.sampler.backend: vllm needs vLLM" in note and "pip install 'posttrain[vllm]'" in note
    assert "cluster.sampler.backend: hf" in note
    with pytest.raises(PosttrainError, match=r"needs vLLM, which is not installed"):
        backends.check_backends(recipe, strict=True)
    assert backends.check_backends(_recipe("hf"), strict=True) == []


@pytest.mark.parametrize("found, blocks", [("0.30.0", None), ("0.30.2+cu128", False), ("", False), ("0.29.1", True),
                                           ("1.30.0", True)])
def test_check_backends_compares_the_vllm_version_with_the_pin(monkeypatch, found, blocks):
    from posttrain import backends

    monkeypatch.setattr(backends, "installed_vllm", lambda: found)
    recipe = _recipe("vllm")
    notes = backends.check_backends(recipe, strict=False)
    assert len(notes) == (blocks is not None)
    if blocks:
        with pytest.raises(PosttrainError, match=f"vLLM {found} is installed, but posttrain is built against"):
            backends.check_backends(recipe, strict=True)
    else:
        assert backends.check_backends(recipe, strict=True) == notes


def test_the_pin_matches_pyproject_and_the_check_is_torch_free():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert extra == [f"vllm=={VLLM_PIN}"]
    code = "import sys, posttrain.backends; assert 'torch' not in sys.modules, 'posttrain.backends imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
