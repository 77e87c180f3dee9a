"""Load models and tokenizers the way a real model is loaded: `from_pretrained` from a path or hub id.

A checkpoint directory is either a full Hugging Face model (config.json + safetensors) or a
peft LoRA adapter (adapter_config.json), whose base model path is recorded inside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.errors import PosttrainError
from posttrain.recipe.schema import LoraConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model a peft adapter directory was trained on."""
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def check_model_path(path: str, where: str = "model.path") -> None:
    """Fail early, with a message that says what to do, if `path` is neither a model directory nor a reachable hub id."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not ((p / "config.json").is_file() or is_adapter_dir(p)):
            raise PosttrainError(f"{where}: {p} is a directory but holds no config.json or adapter_config.json")
        if is_adapter_dir(p):
            check_model_path(adapter_base(p), f"{where} (base of adapter {p})")
        return
    # Hub ids may contain dots ("Qwen/Qwen2.5-1.5B"): only an explicit path or a weights file name is local.
    if path.startswith((".", "/", "~")) or p.suffix in (".safetensors", ".bin", ".pt", ".json"):
        raise PosttrainError(f"{where}: no such model directory: {p.resolve()}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except Exception as exc:  # offline, unknown repo, gated repo: all unusable here
        raise PosttrainError(
            f"{where}: {path!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}). Without network access, download it elsewhere (`hf download {path}`), copy "
            "it here and set model.path to that directory."
        ) from None


def load_tokenizer(path: str | Path, padding_side: str = "right"):
    from transformers import AutoTokenizer

    src = adapter_base(path) if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").exists() else path
    tok = AutoTokenizer.from_pretrained(str(src), padding_side=padding_side)
    if tok.pad_token_id is None:  # many base models ship without a pad token
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, dtype: str = "float32", lora: LoraConfig | None = None, trainable: bool = True):
    """A causal LM ready to train (LoRA-wrapped when `lora` is set) or, with trainable=False, to sample.

    An adapter directory is loaded onto its base: kept as a trainable adapter when training with
    LoRA, merged into the base weights otherwise (sampling is faster without adapter hooks).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = DTYPES[dtype]
    if is_adapter_dir(path):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(adapter_base(path), dtype=torch_dtype)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=trainable and lora is not None)
        if not (trainable and lora is not None):
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        if trainable and lora is not None:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            peft_cfg = PeftLoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, peft_cfg)
    if not trainable:
        model.eval()
    return model


def load_reward_model(path: str | Path, dtype: str = "float32", lora: LoraConfig | None = None,
                      trainable: bool = True):
    """A sequence-level scalar reward model (`AutoModelForSequenceClassification`, one label).

    From a causal-LM checkpoint the scalar head `score` is new (randomly initialised) and the body is the
    policy's; from a reward-model checkpoint both are restored. The score is read at the last non-pad token,
    so the model must know the pad id.
    """
    from transformers import AutoModelForSequenceClassification

    torch_dtype = DTYPES[dtype]
    pad_id = load_tokenizer(path).pad_token_id
    if is_adapter_dir(path):
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(adapter_base(path), num_labels=1, dtype=torch_dtype,
                                                                  pad_token_id=pad_id)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=trainable and lora is not None)
        if not (trainable and lora is not None):
            model = model.merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch_dtype,
                                                                   pad_token_id=pad_id)
        if trainable and lora is not None:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            # SEQ_CLS keeps the new scalar head fully trainable (and saved) beside the adapters.
            model = get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                         target_modules=list(lora.target_modules), task_type="SEQ_CLS"))
    if not trainable:
        model.eval()
    return model


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write base + LoRA merged weights as a plain Hugging Face model (for vLLM or transformers)."""
    if not is_adapter_dir(adapter_dir):
        raise PosttrainError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
    model = load_causal_lm(adapter_dir, dtype, lora=None, trainable=False)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(adapter_dir).save_pretrained(out)
    return out


def weights_digest(model) -> str:
    """SHA-256 over parameter names and values: shows which weights a training run started from."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
