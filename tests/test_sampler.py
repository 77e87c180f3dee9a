"""SamplerWorker (hf backend, both decoders: the lean loop and transformers' generate): per-token log-probs,
padding, n samples, versions."""

import pytest
import torch

from posttrain.algorithms.logprobs import token_logprobs
from posttrain.recipe.schema import SamplingConfig
from posttrain.workers.sampler import SamplerWorker, greedy


@pytest.fixture(scope="module", params=["auto", "generate"])
def sampler(tiny_model, request):
    worker = SamplerWorker(str(tiny_model), threads=1, version=7, decode=request.param)
    assert (worker.decoder is not None) == (request.param == "auto")  # the tiny model is a Llama
    return worker


def _prompts(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def test_logprobs_equal_a_teacher_forced_forward(sampler):
    tok = sampler.tokenizer
    prompts = _prompts(tok, ["1+2-3=", "9-9+9-9=", "4="])
    roll = sampler.generate(prompts, n=2, params=SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=12), batch_size=4)
    assert roll.prompt_index == [0, 0, 1, 1, 2, 2] and roll.version == 7 and roll.n == 2
    for i, ids, lps in zip(roll.prompt_index, roll.completion_ids, roll.logprobs):
        full = torch.tensor([prompts[i] + ids])
        with torch.no_grad():
            ref = token_logprobs(sampler.model(full).logits, full)[0, len(prompts[i]) - 1 :]
        assert len(lps) == len(ids)
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=1e-4)


def test_greedy_is_deterministic_and_independent_of_batch_padding(sampler):
    tok = sampler.tokenizer
    texts = ["1+2-3=", "9-9+9-9=", "4="]
    batched = sampler.generate(_prompts(tok, texts), 1, greedy(10), batch_size=3)
    alone = [sampler.generate(_prompts(tok, [t]), 1, greedy(10), batch_size=1).completion_ids[0] for t in texts]
    assert batched.completion_ids == alone
    assert sampler.generate(_prompts(tok, texts), 1, greedy(10), batch_size=2).completion_ids == alone


def test_completions_stop_at_eos_or_the_token_limit(sampler):
    tok = sampler.tokenizer
    roll = sampler.generate(_prompts(tok, ["1+1="] * 4), 1, SamplingConfig(temperature=1.0, max_new_tokens=5), 4)
    for ids, done in zip(roll.completion_ids, roll.finished):
        assert (ids[-1] == tok.eos_token_id) == done
        assert done or len(ids) == 5
        assert tok.eos_token_id not in ids[:-1]


def test_sampling_is_reproducible_by_seed(sampler):
    tok = sampler.tokenizer
    prompts = _prompts(tok, ["1+2-3=", "4+4="])
    params = SamplingConfig(temperature=1.0, max_new_tokens=10)
    a = sampler.generate(prompts, 3, params, batch_size=6, seed=11)
    b = sampler.generate(prompts, 3, params, batch_size=6, seed=11)
    c = sampler.generate(prompts, 3, params, batch_size=6, seed=12)
    assert a.completion_ids == b.completion_ids and a.completion_ids != c.completion_ids
