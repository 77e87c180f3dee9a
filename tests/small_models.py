"""Randomly initialised small models for the tests that re-implement part of a transformers model (the lean decoder,
the shared-prefix attention): the architecture features those re-implementations must get right."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

EOS, PAD = 2, 0
SMALL = dict(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
KINDS = ["llama_gqa", "qwen2"]


def small_model(kind: str):
    """llama_gqa: grouped-query attention, llama3 rotary scaling, untied head; qwen2: biases on q/k/v. Seeded."""
    torch.manual_seed(0)
    if kind == "llama_gqa":
        cfg = LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 32})
        return LlamaForCausalLM(cfg)
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=4, tie_word_embeddings=True))
