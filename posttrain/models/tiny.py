"""Embedded default model: a character-level tokenizer and a ~0.8M-parameter Llama.

Built locally from a fixed seed, so quickstarts and tests need no hub download. The output
directory is a plain Hugging Face checkpoint (``AutoModelForCausalLM`` / ``AutoTokenizer``).
"""

from __future__ import annotations

import json
import os
import shutil
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch/transformers load only when a model is built: recipes import TinyConfig cheaply
    from transformers import LlamaConfig, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order
# Printable ASCII minus vertical tab / form feed; order is fixed so token ids never change.
CHARSET: tuple[str, ...] = tuple(c for c in string.printable if c not in "\x0b\x0c")

# Plain-character role markers: a char model needs no special tokens for chat structure.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

MARKER_FILE = "posttrain_tiny.json"  # written last: its presence marks a complete build
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER_FILE)


def build_char_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """One token per character of CHARSET; plain ``encode`` adds no bos/eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARSET)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character (newline and space included) becomes its own pre-token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # concatenate tokens with no separator
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # Explicit so the saved config pins it: the training code appends eos itself.
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,  # would rewrite ' .' -> '.' and break round trips
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of the tiny Llama; 512 FFN width gives ~0.79M non-embedding params."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    seed: int = 0


def llama_config(cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """LlamaConfig matching ``cfg``, with vocabulary and special ids taken from ``tokenizer``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        dtype="float32",
    )


def _marker(cfg: TinyConfig) -> dict:
    return {"format": 1, "tiny_config": asdict(cfg)}


def is_complete_build(path: Path, cfg: TinyConfig) -> bool:
    """True if ``path`` holds a finished build of exactly ``cfg``."""
    if not all((path / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        return json.loads((path / MARKER_FILE).read_text()) == _marker(cfg)
    except (OSError, ValueError):
        return False


def _write_build(path: Path, cfg: TinyConfig) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer(model_max_length=cfg.max_position_embeddings)
    config = llama_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):  # deterministic init without disturbing the caller's RNG
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / MARKER_FILE).write_text(json.dumps(_marker(cfg), indent=2) + "\n")


def build_tiny_model(out_dir: str | Path, cfg: TinyConfig = TinyConfig()) -> Path:
    """Build the tiny model + tokenizer into ``out_dir`` (no-op if already built with ``cfg``).

    Builds into a private temp dir and renames it into place, so readers never see a partial
    checkout; if a concurrent builder wins the rename, its (identical) result is kept.
    """
    out = Path(out_dir)
    if is_complete_build(out, cfg):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_build(tmp, cfg)
        _move_into_place(tmp, out, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path, cfg: TinyConfig) -> None:
    """Rename ``tmp`` to ``out``, replacing a stale or partial ``out`` but never a good one."""
    if out.exists() and not is_complete_build(out, cfg):
        stale = out.with_name(f"{out.name}.stale-{os.getpid()}")
        try:
            out.rename(stale)
        except FileNotFoundError:  # another process moved it first
            pass
        else:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(out)  # atomic; succeeds only if ``out`` is absent or an empty directory
    except OSError:
        if not is_complete_build(out, cfg):  # lost the race to something other than an equal build
            raise
