"""SamplerWorker: generate completions with the current policy weights.

Backends: `hf` (transformers models, CPU or GPU) here; `vllm` (GPU) in vllm_sampler.py, which imports vLLM
only when its engine starts. The hf backend decodes Llama-family models with posttrain's lean loop
(models/decode.py) and anything else with transformers' `generate` (`cluster.sampler.decode`). Every rollout
records the weights version it was sampled with, and its per-token log-probabilities under the *unmodified* model
distribution (before temperature/top-k/top-p), the quantity learners recompute, so the two can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from posttrain.algorithms.logprobs import target_logprobs
from posttrain.models.weights import PushedWeights, WeightSyncError, state_of
from posttrain.recipe.schema import SamplingConfig
from posttrain.workers.vllm_sampler import VLLMSamplerWorker


@dataclass
class Rollouts:
    """Completions for a list of prompts, `n` per prompt, prompt-major (prompt i -> rows i*n .. i*n+n-1)."""

    prompt_index: list[int]
    completion_ids: list[list[int]]  # generated tokens, up to and including eos when finished
    logprobs: list[list[float]]  # one per completion token
    text: list[str]  # decoded completion without special tokens
    finished: list[bool]  # stopped at eos (False: hit max_new_tokens)
    version: int  # weights version used
    n: int = 1


def greedy(max_new_tokens: int) -> SamplingConfig:
    return SamplingConfig(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens)


class SamplerWorker:
    def __init__(self, model_path: str, dtype: str = "float32", threads: int = 1, version: int = 0,
                 decode: str = "auto"):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype, self.decode = dtype, decode
        self.load_weights(model_path, version)

    def load_weights(self, model_path: str, version: int) -> int:
        """(Re)load policy weights from a checkpoint directory; returns the version now served."""
        from posttrain.models.decode import LeanDecoder, unsupported_reason
        from posttrain.models.load import load_causal_lm, load_tokenizer

        self.model = load_causal_lm(model_path, self.dtype, lora=None, trainable=False).to(self.device)
        self.tokenizer = load_tokenizer(model_path, padding_side="left")
        self.decoder = None  # None: transformers' generate
        if self.decode == "auto" and unsupported_reason(self.model) is None:
            self.decoder = LeanDecoder(self.model)
        self.version = version
        return version

    @torch.no_grad()
    def update_weights(self, state: PushedWeights | dict[str, torch.Tensor], version: int) -> int:
        """Serve the learner's pushed weights (names of the base model, LoRA merged) as `version`."""
        state = state_of(state)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or (missing := _untied(self.model, missing, state)):
            raise WeightSyncError(f"weights version {version} does not fit the sampler's model: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]} (is the learner training another architecture?)")
        if self.decoder is not None:
            self.decoder.refresh()  # its fused projections are copies
        self.version = version
        return version

    def sleep(self) -> None:
        """Nothing to free: only the vLLM backend gives its GPU memory to colocated learners (see vllm_sampler)."""

    def wake_up(self) -> None:
        """The pair of sleep(): a no-op here, so a loop can call both on any backend."""

    @torch.no_grad()
    def probe(self, prompt: list[int], completion: list[int]) -> tuple[int, list[float]]:
        """(version served, log p of each completion token given what precedes it): the parity probe."""
        ids = torch.tensor([prompt + completion], device=self.device)
        # the forward that samples scores the probe: the lean loop's when it decodes
        if self.decoder is not None:
            logits = self.decoder.score(prompt + completion)
        else:
            logits = self.model(input_ids=ids).logits[0]
        return self.version, target_logprobs(logits[len(prompt) - 1 : -1].float(), ids[0, len(prompt) :]).tolist()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, params: SamplingConfig, batch_size: int,
                 seed: int = 0) -> Rollouts:
        """Sample n completions for each tokenised prompt, in padded batches of `batch_size` sequences.

        Seeded per call, so a result depends on (prompts, params, seed), not on which actor served it.
        """
        torch.manual_seed(seed)
        rows = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        out = Rollouts([], [], [], [], [], self.version, n)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, lps, done = self._generate_batch([p for _, p in chunk], params)
            out.prompt_index += [i for i, _ in chunk]
            out.completion_ids += ids
            out.logprobs += lps
            out.finished += done
        out.text = self.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        return out

    def _generate_batch(self, prompts: list[list[int]], params: SamplingConfig):
        tok = self.tokenizer
        if self.decoder is not None:
            return self.decoder.generate(prompts, params.max_new_tokens, params.temperature, params.top_k,
                                         params.top_p, tok.eos_token_id)
        T = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), T), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column T-1
            input_ids[i, T - len(p) :] = torch.tensor(p)
            attention[i, T - len(p) :] = 1
        do_sample = params.temperature > 0
        sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k) if do_sample else {}
        # a config of its own: the model's generation_config (a checkpoint's top_k, repetition penalty ...) must not
        # change what the recipe asked for
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=do_sample, **sampling,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  output_logits=True, return_dict_in_generate=True)
        gen = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                  generation_config=config)
        new = gen.sequences[:, T:].cpu()  # (B, L)
        logits = torch.stack(gen.logits, dim=1).float().cpu()  # (B, L, V): raw, before any warper
        lp = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (B, L)
        ids_out, lps_out, done = [], [], []
        for row, row_lp in zip(new.tolist(), lp.tolist()):
            n = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            ids_out.append(row[:n])
            lps_out.append(row_lp[:n])
            done.append(tok.eos_token_id in row)
        return ids_out, lps_out, done


def _untied(model: torch.nn.Module, missing: list[str], loaded: dict) -> list[str]:
    """The missing names that are not tied to a loaded parameter (tied weights are pushed once)."""
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    tied_loaded = {n for names in names_of.values() if any(m in loaded for m in names) for n in names}
    return [m for m in missing if m not in tied_loaded]


SAMPLER_BACKENDS = {"hf": SamplerWorker, "vllm": VLLMSamplerWorker}
