"""Shared-prefix micro-batches (models/shared_prefix.py, pack_shared_prefix, deal_groups): the layout, log-probs and
gradients equal to each sequence run alone through transformers, the learner's update equal to the row layout's
(LoRA included), and the dealing of groups to micro-batches."""

from __future__ import annotations

import os

import pytest
import torch
from small_models import small_model
from transformers import GPT2Config

from posttrain.algorithms.rl_config import GRPOConfig
from posttrain.algorithms.rl_objective import RLObjective
from posttrain.data.batching import Example, RLSample, collate_rl, deal_even, deal_groups, pack_shared_prefix
from posttrain.loops.online_rl import shared_prefix_supported
from posttrain.models.shared_prefix import shared_prefix_forward
from posttrain.recipe.schema import LoraConfig, OptimConfig
from posttrain.workers.learner import LearnerSpec, LearnerWorker

P1, P2, P3 = [1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13]
# Prompts repeat out of order, lengths differ, one completion is a single token.
SEQS = [(P1, [20, 21, 22, 2]), (P2, [23, 2]), (P1, [24, 25]), (P3, [26, 27, 28, 29, 30, 2]), (P1, [31]),
        (P2, [32, 33, 34, 2])]


def _model(kind: str):
    return small_model(kind).double()


def _alone(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion token | everything before it), the sequence alone in a batch of one (float64 throughout)."""
    ids = torch.tensor([prompt + completion])
    logps = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt) - 1 :]


def test_layout_lays_each_prompt_out_once():
    b = pack_shared_prefix([Example(P1 + [20, 21], 4), Example(P2 + [23], 2), Example(P1 + [24, 25], 4)])
    # each completion's last token (21, 23, 25) is only a target: nothing reads its hidden state
    assert b.input_ids.tolist() == [[1, 5, 6, 7, 20, 1, 8, 24]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 4]]
    # P1's last position (3) predicts the first token of both its completions
    assert b.logits_to_keep.tolist() == [3, 4, 6, 3, 7]
    assert b.target_ids.tolist() == [20, 21, 23, 24, 25]
    assert b.target_seq.tolist() == [0, 0, 1, 2, 2]
    seg = b.segments
    # sequence 2's one query sees its prompt's copy and itself, nothing of sequence 0's completion (position 4)
    assert seg.query_index[2, :1].tolist() == [7] and seg.key_index[2].tolist() == [0, 1, 2, 3, 7]
    assert seg.visible[2, :1].tolist() == [5] and seg.mask()[2, 0, 0].tolist() == [True] * 5
    assert sorted(seg.inverse.tolist()) == sorted(set(seg.inverse.tolist()))  # every position owned exactly once


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2"])
def test_log_probs_and_gradients_equal_each_sequence_alone(kind):
    model = _model(kind)
    weights = torch.linspace(-1.0, 1.0, sum(len(c) for _, c in SEQS), dtype=torch.float64)
    # expected: every sequence alone, no packing, no mask
    expected = torch.cat([_alone(model, p, c) for p, c in SEQS])
    (expected * weights).sum().backward()
    grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    model.zero_grad()

    b = pack_shared_prefix([Example(p + c, len(p)) for p, c in SEQS])
    assert b.input_ids.shape[1] == len(P1 + P2 + P3) + sum(len(c) - 1 for _, c in SEQS)

    def logps(batch):
        with shared_prefix_forward(model):
            logits = model(**batch.model_inputs("cpu")).logits.flatten(0, -2)
        return torch.log_softmax(logits, -1).gather(-1, batch.target_ids[:, None])[:, 0]

    got = logps(b)
    assert model.config._attn_implementation == "sdpa"  # switched back after the forward
    # float64 model, but transformers' RMSNorm and rotary tables work in float32: agreement to float32 rounding
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)  # targets are in sequence order here
    (got * weights).sum().backward()
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.grad, grads[k], atol=1e-6, rtol=1e-6, msg=k)
    # the test can fail: a query that also sees its sequence's later tokens scores differently
    seg = b.segments
    seg.visible[:] = torch.where(seg.visible > 0, seg.n_keys[:, None], 0)
    with torch.no_grad():
        assert (logps(b) - expected).abs().max() > 1e-3


def _learner(model_path, lora=None) -> LearnerWorker:
    spec = LearnerSpec(model_path=str(model_path), dtype="float32", lora=lora,
                       optim=OptimConfig(lr=1e-2, warmup_steps=0, eps=1.0), total_steps=10, micro_batches_per_step=1,
                       micro_batch_size=len(SEQS), backend="torch", seed=0, live_reference=True)
    w = LearnerWorker(0, 1, spec)
    w.setup("127.0.0.1", 0)
    return w


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, alpha=8)], ids=["full", "lora"])
def test_learner_update_equals_the_row_layouts(tiny_model, lora):
    obj = RLObjective("grpo", GRPOConfig(beta=0.04))
    rows, shared = _learner(tiny_model, lora), _learner(tiny_model, lora)
    samples = [RLSample(p, c, rows.probe(p, c), advantages=[a] * len(c))
               for (p, c), a in zip(SEQS, [1.0, -0.5, 0.25, -1.0, 0.75, -0.25])]
    totals = {"seqs": float(len(samples)), "tokens": float(sum(len(s.completion) for s in samples))}
    start = {k: v.detach().clone() for k, v in rows.model.named_parameters() if v.requires_grad}
    out_rows = rows.rl_step(0, [collate_rl(samples, 0, None)], totals, obj)
    out_shared = shared.rl_step(0, [collate_rl(samples, 0, None, shared_prefix=True)], totals, obj)
    assert out_rows["grad_norm"] > 0
    for key in ("loss_sum", "kl", "grad_norm", "ratio_mean"):
        assert out_shared[key] == pytest.approx(out_rows[key], rel=1e-5, abs=1e-7), key
    for (name, a), b in zip(rows.model.named_parameters(), shared.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(v, start[k]) for k, v in rows.model.named_parameters() if v.requires_grad)


def _sample(prompt: list[int], n: int) -> RLSample:
    return RLSample(prompt, [3] * n, [0.0] * n)


def test_deal_groups_keeps_prompts_together_and_balances_tokens():
    # 4 groups of 4: two long-prompt groups with long completions, two short ones
    groups = [([1] * 20, 30), ([2] * 20, 28), ([3] * 2, 5), ([4] * 2, 4)]
    samples = [_sample(p, n) for p, n in groups for _ in range(4)]
    dealt = deal_groups(samples, world=2, gas=1)
    assert [len(mb) for rank in dealt for mb in rank] == [8, 8]  # deal_even's sizes
    for rank in dealt:  # every micro-batch holds whole groups: one long, one short
        prompts = [tuple(s.prompt) for s in rank[0]]
        assert len(set(prompts)) == 2 and all(prompts.count(p) == 4 for p in set(prompts))
    tokens = [sum(len(s.completion) for s in rank[0]) + sum(len(p) for p in {tuple(s.prompt) for s in rank[0]})
              for rank in dealt]
    assert tokens == [20 + 4 * 30 + 2 + 4 * 4, 20 + 4 * 28 + 2 + 4 * 5]  # largest first, to the emptiest
    # deal_even sorts by length instead: rank 1 would get both long groups
    even = deal_even(samples, world=2, gas=1)
    assert {tuple(s.prompt) for s in even[1][0]} == {(1,) * 20, (2,) * 20}


def test_deal_groups_splits_a_group_that_fits_nowhere_whole():
    samples = [_sample([7, 7], 3) for _ in range(6)] + [_sample([8], 1) for _ in range(2)]
    dealt = deal_groups(samples, world=2, gas=2)
    sizes = [len(mb) for rank in dealt for mb in rank]
    assert sorted(sizes) == [2, 2, 2, 2] and len(dealt) == 2 and all(len(r) == 2 for r in dealt)
    assert sorted(id(s) for rank in dealt for mb in rank for s in mb) == sorted(id(s) for s in samples)


def test_shared_prefix_is_used_only_for_the_models_it_runs_exactly(tiny_model, tmp_path):
    assert shared_prefix_supported(str(tiny_model))
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=48).save_pretrained(tmp_path / "gpt2")
    assert not shared_prefix_supported(str(tiny_model), str(tmp_path / "gpt2"))


def _direct_attention(q, k, v, seg, scale):
    """Each owned query's softmax over the keys it sees, one at a time in float64: the definition."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for s in range(seg.query_index.shape[0]):
        for i in range(int(seg.n_queries[s])):
            r, keys = int(seg.query_index[s, i]), seg.key_index[s, : int(seg.visible[s, i])]
            for h in range(q.shape[1]):
                kh, vh = k[keys, h // group].double(), v[keys, h // group].double()
                out[r, h] = torch.softmax(kh @ q[r, h].double() * scale, dim=0) @ vh
    return out


def test_cpu_kernel_equals_the_definition_and_torchs_attention():
    import shutil

    from posttrain import kernels
    from posttrain.models.shared_prefix import kernel_attention, torch_attention

    if kernels.load("shared_prefix_attention") is None:
        assert shutil.which("g++") is None and not os.environ.get("CXX"), "a compiler is here: the kernel must build"
        pytest.skip("no C++ compiler: torch's attention runs instead")
    seg = pack_shared_prefix([Example(p + c, len(p)) for p, c in SEQS]).segments
    N = int(seg.inverse.numel())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(N, h, 32, generator=gen, requires_grad=True) for h in (4, 2, 2))  # grouped-query heads
    grad_out = torch.randn(N, 4, 32, generator=gen)
    scale = 32**-0.5

    got = kernel_attention(q, k, v, seg, scale)
    torch.testing.assert_close(got.double(), _direct_attention(q, k, v, seg, scale), atol=2e-6, rtol=0)
    torch.testing.assert_close(got, torch_attention(q, k, v, seg, scale), atol=2e-6, rtol=0)
    # gradients against autograd through the float64 definition (prompt keys collect from every sequence's queries)
    grads = torch.autograd.grad(got, (q, k, v), grad_out)
    expected = torch.autograd.grad(_direct_attention(q, k, v, seg, scale), (q, k, v), grad_out.double())
    for name, a, b in zip("qkv", grads, expected):
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-5, msg=name)
    # the test can fail: seeing one more key (a sequence's next token) changes the output
    seg.visible[:] = torch.where((seg.visible > 0) & (seg.visible < seg.n_keys[:, None]), seg.visible + 1, seg.visible)
    assert (kernel_attention(q, k, v, seg, scale) - got).abs().max() > 1e-2


def test_kernel_loader_falls_back_to_torch_without_a_working_compiler(monkeypatch, tmp_path, caplog):
    from posttrain import kernels

    monkeypatch.setenv("POSTTRAIN_KERNEL_CACHE", str(tmp_path))  # nothing cached: it must build
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    kernels.load.cache_clear()
    try:
        assert kernels.load("shared_prefix_attention") is None
        assert "could not build the shared_prefix_attention kernel" in caplog.text and not list(tmp_path.iterdir())
        monkeypatch.delenv("CXX")
        monkeypatch.setenv("POSTTRAIN_CPU_KERNELS", "0")
        kernels.load.cache_clear()
        assert kernels.load("shared_prefix_attention") is None  # switched off: not even built
        assert not list(tmp_path.iterdir())
    finally:
        kernels.load.cache_clear()
