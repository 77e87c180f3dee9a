"""SFT loss, token log-probs and the LR schedule against hand-computed values."""

import math

import pytest
import torch

from posttrain.algorithms.logprobs import target_logprobs, token_logprobs
from posttrain.algorithms.sft import completion_nll
from posttrain.optim import lr_multiplier


def test_token_logprobs_match_log_softmax_by_hand():
    # Vocabulary of 3; logits [0, ln 2, ln 3] -> p = [1/6, 2/6, 3/6] at every position.
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0])).expand(1, 4, 3).clone()
    ids = torch.tensor([[0, 2, 1, 0]])
    lp = token_logprobs(logits, ids)
    expected = torch.tensor([[math.log(3 / 6), math.log(2 / 6), math.log(1 / 6)]])
    torch.testing.assert_close(lp, expected)


def test_target_logprobs_on_selected_positions_and_in_float32_for_bf16():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 2.0]]))  # (K=2, V=3)
    lp = target_logprobs(logits, torch.tensor([2, 0]))
    torch.testing.assert_close(lp, torch.tensor([math.log(3 / 6), math.log(4 / 10)]))
    assert target_logprobs(logits.bfloat16(), torch.tensor([2, 0])).dtype == torch.float32


def test_completion_nll_counts_only_completion_tokens():
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0])).expand(2, 4, 3).clone()
    ids = torch.tensor([[0, 2, 1, 0], [1, 1, 2, 0]])
    # Row 0: prompt = 2 tokens, completion = tokens 2,3. Row 1: prompt 1 token, completion tokens 1,2; token 3 is padding.
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.float32)
    nll, n = completion_nll(logits, ids, mask)
    by_hand = -(math.log(2 / 6) + math.log(1 / 6)) - (math.log(2 / 6) + math.log(3 / 6))
    assert n.item() == 4
    assert nll.item() == pytest.approx(by_hand, rel=1e-6)


def test_completion_nll_gradient_ignores_prompt_positions():
    logits = torch.randn(1, 5, 7, requires_grad=True)
    ids = torch.randint(0, 7, (1, 5))
    mask = torch.tensor([[0, 0, 0, 1, 1]], dtype=torch.float32)  # targets are tokens 3 and 4 -> positions 2, 3
    nll, _ = completion_nll(logits, ids, mask)
    nll.backward()
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[0, 4].abs().sum() == 0
    assert logits.grad[0, 2].abs().sum() > 0 and logits.grad[0, 3].abs().sum() > 0


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = lambda s: lr_multiplier(s, total_steps=110, warmup_steps=10, schedule="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay: cos(pi/2) = 0
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert lr_multiplier(50, 100, 0, "constant", 0.1) == 1.0
