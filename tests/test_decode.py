"""The lean decode loop (models/decode.py) against transformers itself: teacher-forced log-probs, greedy tokens
equal to `generate`'s, HF's sampling warpers, rows that finish early, and the architectures it declines."""

from __future__ import annotations

import pytest
import torch
from small_models import EOS, PAD, SMALL, small_model
from transformers import GenerationConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from posttrain.algorithms.logprobs import token_logprobs
from posttrain.models.decode import LeanDecoder, sample_categorical, unsupported_reason, warp


def _model(kind: str):
    if kind == "llama_hd32":  # head size 32: the C++ decode-attention kernel runs (float32, CPU)
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_attention_heads": 2}, num_key_value_heads=1))
    else:
        model = small_model(kind)
    model.eval()
    # Random weights rarely pick EOS: make it outbid the token greedy decoding picks most after the first few steps,
    # so rows end at different steps.
    ids, _, _ = LeanDecoder(model).generate(PROMPTS, 12, 0.0, 0, 1.0, EOS)
    common = torch.tensor([t for row in ids for t in row[3:]]).mode().values.item()
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight[common] * 1.05
    return model


PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 11], [1, 12, 13, 14], [1, 15, 16, 17, 18], [1, 19, 20, 21, 22, 23, 24, 25, 26]]


def _teacher_forced(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    full = torch.tensor([prompt + completion])
    with torch.no_grad():
        return token_logprobs(model(full).logits, full)[0, len(prompt) - 1 :]


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "llama_hd32"])
def test_greedy_equals_generate_and_log_probs_equal_a_teacher_forced_forward(kind):
    model = _model(kind)
    assert unsupported_reason(model) is None
    ids, lps, done = LeanDecoder(model).generate(PROMPTS, 24, 0.0, 0, 1.0, EOS)
    for prompt, row, lp, ended in zip(PROMPTS, ids, lps, done):  # one by one: no padding on the HF side
        cfg = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        ref = model.generate(torch.tensor([prompt]), generation_config=cfg)[0, len(prompt) :].tolist()
        assert row == ref[: len(row)] and (ended == (row[-1] == EOS)) and (ended or len(row) == 24)
        torch.testing.assert_close(torch.tensor(lp), _teacher_forced(model, prompt, row), atol=2e-5, rtol=0)
    assert any(done) and len({len(r) for r in ids}) > 1  # rows ended at different steps


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "llama_hd32"])
def test_sampled_rows_keep_their_own_cache_when_finished_rows_are_dropped(kind):
    """32 rows at temperature 1, each prompt repeated (prefilled once, then copied to its rows): many end early and
    are dropped from the batch; every survivor's log-probs must still be those of its own prefix (a mixed-up cache
    row would change them)."""
    model = _model(kind)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    gen = torch.Generator().manual_seed(1)
    ids, lps, done = LeanDecoder(model).generate(prompts, 40, 1.0, 0, 1.0, EOS, gen)
    lengths = sorted(len(r) for r in ids)
    assert sum(done) >= 8 and lengths[0] < 20 and lengths[-1] == 40  # rows were dropped at several steps
    for prompt, row, lp in zip(prompts, ids, lps):
        torch.testing.assert_close(torch.tensor(lp), _teacher_forced(model, prompt, row), atol=2e-5, rtol=0)


def test_decode_kernel_samples_what_torchs_ops_sample(monkeypatch):
    from posttrain import kernels
    from posttrain.models import decode

    if kernels.load("decode_attention") is None:
        pytest.skip("no C++ compiler: torch's ops decode instead")
    model = _model("llama_hd32")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]  # left-padded: some cache slots are never readable
    calls = []
    kernel_of = decode._decode_kernel
    monkeypatch.setattr(decode, "_decode_kernel", lambda *a: calls.append(1) or kernel_of(*a))
    with_kernel = LeanDecoder(model).generate(prompts, 30, 1.0, 0, 1.0, EOS, torch.Generator().manual_seed(3))
    assert calls and kernel_of(torch.zeros(1), 32, torch.zeros(1)) is not None  # the kernel ran
    monkeypatch.setattr(decode, "_decode_kernel", lambda *a: None)
    with_torch = LeanDecoder(model).generate(prompts, 30, 1.0, 0, 1.0, EOS, torch.Generator().manual_seed(3))
    assert with_kernel[0] == with_torch[0] and with_kernel[2] == with_torch[2]  # same draws: same tokens
    assert any(with_kernel[2]) and not all(with_kernel[2])
    for a, b in zip(with_kernel[1], with_torch[1]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


def test_score_is_the_teacher_forced_forward_and_refresh_follows_new_weights():
    model = _model("llama_gqa")
    dec = LeanDecoder(model)
    seq = PROMPTS[0] + [30, 31, 32]
    with torch.no_grad():
        torch.testing.assert_close(dec.score(seq), model(torch.tensor([seq])).logits[0], atol=1e-5, rtol=0)
        for p in model.parameters():
            p.mul_(1.5)
        dec.refresh()
        torch.testing.assert_close(dec.score(seq), model(torch.tensor([seq])).logits[0], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                             (0.5, 10, 0.9), (1.0, 100, 0.3)])
def test_warp_is_hf_temperature_then_top_k_then_top_p(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 48) * 3
    ref = logits.clone()
    if temperature != 1.0:
        ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    torch.testing.assert_close(warp(logits, temperature, top_k, top_p), ref)


def test_sample_categorical_draws_each_token_at_its_probability():
    """50k draws per row: every frequency within 4.5 standard errors of its probability, a token of probability 0
    (warped away) never drawn, an unnormalised row read as normalised, and the same seed gives the same draws."""
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0, 0.7, 0.0, 0.3], [1e-3, 0.0, 0.999, 0.0],
                          [0.0, 2.0, 0.0, 2.0]])
    expected = (probs / probs.sum(-1, keepdim=True)).double()
    n = 50_000
    draws = sample_categorical(probs.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, len(probs))
    for r in range(len(probs)):
        freq = torch.bincount(draws[:, r], minlength=probs.shape[1]).double() / n
        stderr = (expected[r] * (1 - expected[r]) / n).sqrt()
        assert ((freq - expected[r]).abs() <= 4.5 * stderr).all(), (r, freq, expected[r])
        assert (freq[expected[r] == 0] == 0).all()
    again = sample_categorical(probs.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, len(probs))
    assert torch.equal(draws, again)


def test_non_finite_logits_stop_generation_with_a_clear_error():
    model = small_model("llama_gqa")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="logits are not finite"):
        LeanDecoder(model).generate(PROMPTS, 4, 1.0, 0, 1.0, EOS, torch.Generator().manual_seed(0))


def test_other_architectures_fall_back_to_generate():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=48, n_embd=32, n_layer=1, n_head=2))
    assert "model_type 'gpt2'" in unsupported_reason(gpt2)
    windowed = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=16, max_window_layers=0))
    assert "sliding-window" in unsupported_reason(windowed)
    with pytest.raises(ValueError, match="does not run this model"):
        LeanDecoder(gpt2)
