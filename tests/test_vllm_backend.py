"""The vLLM sampler adapter against a stand-in `vllm` module (vLLM needs a GPU; this checks our side of the API)."""

import sys
import types
from dataclasses import dataclass

import pytest

from posttrain.recipe.schema import SamplingConfig

EOS = 2


@dataclass
class _Logprob:
    logprob: float


class _FakeLLM:
    """Answers each prompt with n sequences: [last prompt token + j, EOS] for even j, a length-capped one otherwise."""

    calls: list = []

    def __init__(self, model, dtype, gpu_memory_utilization):
        self.model = model
        self.tok = types.SimpleNamespace(eos_token_id=EOS)

    def get_tokenizer(self):
        return self.tok

    def generate(self, prompts, sp, use_tqdm=False):
        _FakeLLM.calls.append((prompts, sp))
        if getattr(sp, "prompt_logprobs", None) is not None:  # scoring: log p(token t | < t) = -t / 10, None at 0
            ids = prompts[0]["prompt_token_ids"]
            scored = [None] + [{tok: _Logprob(-t / 10)} for t, tok in enumerate(ids) if t > 0]
            return [types.SimpleNamespace(prompt_logprobs=scored, outputs=[])]
        out = []
        for p in prompts:
            seqs = []
            for j in range(sp.n):
                ids = [p["prompt_token_ids"][-1] + j, EOS] if j % 2 == 0 else [7] * sp.max_tokens
                lps = [{t: _Logprob(-0.5 * (k + 1))} for k, t in enumerate(ids)]
                seqs.append(types.SimpleNamespace(token_ids=tuple(ids), logprobs=lps, text=f"seq{j}"))
            out.append(types.SimpleNamespace(outputs=seqs))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM = _FakeLLM
    mod.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    _FakeLLM.calls = []
    return mod


def test_vllm_adapter_maps_params_and_outputs(fake_vllm, tiny_model):
    from posttrain.workers.sampler import VLLMSamplerWorker

    w = VLLMSamplerWorker(str(tiny_model), version=3)
    roll = w.generate([[10, 11], [20]], n=2, params=SamplingConfig(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=4),
                      batch_size=99)
    prompts, sp = _FakeLLM.calls[-1]
    assert prompts == [{"prompt_token_ids": [10, 11]}, {"prompt_token_ids": [20]}]
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.logprobs) == (2, 0.7, 0.9, -1, 4, 0)
    assert roll.prompt_index == [0, 0, 1, 1] and roll.version == 3 and roll.n == 2
    assert roll.completion_ids == [[11, EOS], [7, 7, 7, 7], [20, EOS], [7, 7, 7, 7]]
    assert roll.finished == [True, False, True, False]
    assert roll.logprobs[0] == [-0.5, -1.0] and roll.logprobs[1] == [-0.5, -1.0, -1.5, -2.0]
    assert roll.text == ["seq0", "seq1", "seq0", "seq1"]


def test_vllm_probe_reads_the_completion_tokens_prompt_logprobs(fake_vllm, tiny_model):
    from posttrain.workers.sampler import VLLMSamplerWorker

    w = VLLMSamplerWorker(str(tiny_model), version=5)
    version, lps = w.probe([10, 11, 12], [13, 14])
    prompts, sp = _FakeLLM.calls[-1]
    assert prompts == [{"prompt_token_ids": [10, 11, 12, 13, 14]}] and (sp.prompt_logprobs, sp.max_tokens) == (0, 1)
    assert version == 5 and lps == [-0.3, -0.4]  # positions 3 and 4 of the scored sequence


def test_missing_vllm_is_a_clear_error(monkeypatch, tiny_model):
    from posttrain.errors import PosttrainError
    from posttrain.workers.sampler import VLLMSamplerWorker

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(PosttrainError, match=r"pip install 'posttrain\[vllm\]'"):
        VLLMSamplerWorker(str(tiny_model))
