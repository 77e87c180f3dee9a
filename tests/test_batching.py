"""Tokenisation, batch order and sharding of the SFT data path."""

import json

import pytest
import torch

from posttrain.data.batching import Example, collate, encode_example, shard_step, step_indices
from posttrain.models.tiny import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_encode_example_masks_prompt_and_appends_eos(tok):
    ex, truncated = encode_example(tok, {"prompt": "1+2=", "completion": "1+2=3;#3", "messages": None}, max_length=64)
    assert not truncated
    assert ex.n_prompt == 4
    assert tok.decode(ex.input_ids[:4]) == "1+2="
    assert tok.decode(ex.input_ids[4:-1]) == "1+2=3;#3" and ex.input_ids[-1] == tok.eos_token_id
    b = collate([ex], tok.pad_token_id)
    assert b.loss_mask[0].tolist() == [0] * 4 + [1] * 9
    assert b.n_target_tokens == 9


def test_encode_example_renders_messages_with_the_chat_template(tok):
    row = {"prompt": "", "completion": "4", "messages": json.dumps([{"role": "user", "content": "2+2"}])}
    ex, _ = encode_example(tok, row, max_length=64)
    expected_prompt = tok.apply_chat_template([{"role": "user", "content": "2+2"}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex.input_ids[: ex.n_prompt]) == expected_prompt


def test_truncation_is_reported(tok):
    ex, truncated = encode_example(tok, {"prompt": "abc", "completion": "x" * 50, "messages": None}, max_length=10)
    assert truncated and len(ex.input_ids) == 10 and ex.n_prompt == 3


def test_step_indices_are_a_pure_function_of_seed_and_step():
    a = [step_indices(10, 4, s, seed=3) for s in range(5)]
    assert a == [step_indices(10, 4, s, seed=3) for s in range(5)]
    assert a != [step_indices(10, 4, s, seed=4) for s in range(5)]
    flat = sum(a, [])  # 20 indices = 2 epochs; each epoch is a permutation of 0..9
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_shard_step_gives_every_rank_the_same_number_of_length_sorted_micro_batches():
    exs = [Example(list(range(n)), 1) for n in (5, 2, 9, 3, 7, 4, 8, 6)]
    shards = shard_step(exs, world_size=2, micro_batch_size=2, pad_id=0)
    assert [len(r) for r in shards] == [2, 2]
    widths = sorted(mb.input_ids.shape[1] for r in shards for mb in r)
    assert widths == [3, 5, 7, 9]  # sorted pairs (2,3) (4,5) (6,7) (8,9): padding to the pair's max only
    total = sum(mb.attention_mask.sum().item() for r in shards for mb in r)
    assert total == sum(len(e.input_ids) for e in exs)
    with pytest.raises(ValueError):
        shard_step(exs, world_size=3, micro_batch_size=2, pad_id=0)


def test_collate_right_pads(tok):
    b = collate([Example([5, 6, 7], 1), Example([8], 0)], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.input_ids.dtype == torch.long


def test_rl_batches_carry_per_token_fields_through_packing():
    from posttrain.data.batching import RLSample, collate_rl, deal

    samples = [RLSample([1, 2, 3], [4, 5], [-0.1, -0.2], advantages=[1.0, 1.0]),
               RLSample([1, 2], [6, 7, 8, 9], [-0.3, -0.4, -0.5, -0.6], advantages=[-2.0] * 4),
               RLSample([7], [3], [-0.7], advantages=[0.5])]
    for capacity in (None, 8):  # padded rows, and packed rows (sequence 0 and 2 share a row)
        b = collate_rl(samples, pad_id=0, capacity=capacity)
        assert b.n_tokens == 7 and set(b.fields) == {"sampler_logps", "advantages"}
        grid, mask = b.padded(b.fields["sampler_logps"])
        assert mask.sum(-1).tolist() == [2, 4, 1]
        assert grid[1].tolist() == pytest.approx([-0.3, -0.4, -0.5, -0.6]) and grid[2, 0].item() == pytest.approx(-0.7)
        # the targets are the completion tokens, each at its position
        assert b.padded(b.tokens.target_ids.float())[0][1].tolist() == [6, 7, 8, 9]
    if capacity == 8:
        assert b.tokens.input_ids.shape[0] == 2
    assert [len(r) for r in deal(list(range(8)), 2, 2, lambda x: -x)] == [2, 2]
    assert deal(list(range(8)), 2, 2, lambda x: -x)[0] == [[7, 6], [3, 2]]


def test_deal_even_gives_every_rank_the_same_number_of_micro_batches():
    from posttrain.data.batching import RLSample, deal_even

    samples = [RLSample([1], [2] * n, [0.0] * n) for n in (5, 1, 4, 2, 3, 7, 6)]
    shards = deal_even(samples, world=2, gas=2)
    assert [len(rank) for rank in shards] == [2, 2]
    sizes = sorted(len(mb) for rank in shards for mb in rank)
    assert sizes == [1, 2, 2, 2] and sum(sizes) == 7  # near-equal, nothing dropped
    assert [len(s.completion) for s in shards[0][0]] == [1, 2]  # length-sorted before splitting
