"""Embedded char tokenizer and tiny Llama: exact round trips, stable ids, deterministic builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.tiny import CHARSET, MARKER_FILE, TinyConfig, build_char_tokenizer, build_tiny_model

TRICKY = [
    "",
    " ",
    "2+9-1-4=2+9=11;11-1=10;10-4=6;#6",
    "  leading and trailing  ",
    "multi\n\nline\n",
    "tab\there\r\n",
    "<|user|>\nhi\n",
    "a  .  b ,c ' d",  # clean_up_tokenization_spaces would mangle this
    "".join(CHARSET),
]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_charset_is_printable_ascii_without_vt_ff():
    assert len(CHARSET) == 98 and len(set(CHARSET)) == 98
    assert "\x0b" not in CHARSET and "\x0c" not in CHARSET
    assert {" ", "\n", "\t", "\r", "#", ";", "-"} <= set(CHARSET)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text


def test_special_and_char_ids_are_fixed(tok):
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert tok("0")["input_ids"] == [4]  # CHARSET starts with the digits
    assert build_char_tokenizer()("0 9\n")["input_ids"] == tok("0 9\n")["input_ids"] == [4, 98, 13, 100]
    assert len(tok) == 4 + len(CHARSET) == 102


def test_plain_encode_adds_no_bos_or_eos(tok):
    assert tok("12")["input_ids"] == [5, 6]
    assert tok.encode("12") == [5, 6]


def test_unknown_character_maps_to_unk(tok):
    assert tok("é")["input_ids"] == [tok.unk_token_id]


def test_chat_template_exact_rendering(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3="}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.\n<|user|>\n2+3=\n<|assistant|>\n"
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<|system|>\nBe brief.\n<|user|>\n2+3=\n"
    assert tok.unk_token_id not in tok(rendered)["input_ids"]


def test_build_loads_with_auto_classes(built):
    assert (built / "model.safetensors").is_file()
    assert json.loads((built / MARKER_FILE).read_text())["tiny_config"]["hidden_size"] == 128
    model = AutoModelForCausalLM.from_pretrained(built)
    tok = AutoTokenizer.from_pretrained(built)
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert model.config.vocab_size == len(tok) == 102
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings are counted once
    assert 0.75e6 < n_params < 0.85e6
    # The reloaded tokenizer behaves exactly like the built one.
    assert tok("a b\n")["input_ids"] == [14, 98, 15, 100]
    assert tok.decode(tok("x  y")["input_ids"]) == "x  y"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|user|>\nhi\n"
    logits = model(torch.tensor([[1, 4, 5]])).logits  # [batch=1, seq=3, vocab]
    assert logits.shape == (1, 3, 102)


def test_build_is_deterministic(built, tmp_path):
    other = build_tiny_model(tmp_path / "again")
    a = AutoModelForCausalLM.from_pretrained(built).state_dict()
    b = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_build_does_not_disturb_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_second_build_is_noop(built):
    weights = built / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_model(built) == built
    assert weights.stat().st_mtime_ns == before
    assert not list(built.parent.glob("*.tmp-*"))


def test_different_config_rebuilds(tmp_path):
    out = build_tiny_model(tmp_path / "m", TinyConfig(num_layers=1, seed=1))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    build_tiny_model(out, TinyConfig(num_layers=2, seed=1))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or stale dirs left behind


def test_incomplete_dir_is_replaced(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")  # e.g. a crashed non-atomic writer
    build_tiny_model(out)
    assert (out / MARKER_FILE).is_file()
    AutoModelForCausalLM.from_pretrained(out)


def _build_in_child(out: str) -> None:
    build_tiny_model(out)


def test_concurrent_builders_all_succeed(tmp_path):
    import multiprocessing as mp

    out = tmp_path / "m"
    ctx = mp.get_context("fork")  # fork: no re-import of torch/transformers in the children
    procs = [ctx.Process(target=_build_in_child, args=(str(out),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    AutoModelForCausalLM.from_pretrained(out)
