"""VLLMSamplerWorker: the sampler interface of `sampler.py` on a vLLM engine (GPU). Needs the `posttrain[vllm]` extra.

vLLM itself is imported only when an engine starts, so this module (and its pure helpers, tested on CPU against a
stand-in `vllm`) imports without it. The vLLM API used here was checked against vllm-project/vllm sources
(`vllm/entrypoints/llm.py`, `vllm/sampling_params.py`, `vllm/engine/arg_utils.py`, `vllm/lora/request.py`,
`vllm/config/lora.py`, `vllm/v1/core/sched/utils.py`, `vllm/v1/engine/parallel_sampling.py`); see
tests/test_vllm_backend.py for the signatures its stand-in copies.

Rollouts follow the HF backend's conventions field by field: completion tokens only, up to and including EOS; the
sampled token's log-probability under the raw model distribution (before temperature and top-k/p, vLLM's
`logprobs_mode="raw_logprobs"`); finished = ended with EOS; text decoded with the same tokenizer call.

Weights: `update_weights` loads the learners' merged state in place in every vLLM worker (the default: what
online_rl pushes). With `weight_sync="adapter"` the engine serves a LoRA adapter instead and `load_weights` swaps in
each new adapter directory under a new LoRA id. Versions strictly increase; a refused update changes nothing, and a
failed one leaves the version as it was and the worker refusing to sample until a later update succeeds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from posttrain.errors import PosttrainError
from posttrain.models.weights import PushedWeights, WeightSyncError, state_of
from posttrain.recipe.schema import SamplingConfig

if TYPE_CHECKING:
    from posttrain.workers.sampler import Rollouts

WeightSync = Literal["merged", "adapter"]

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature samples greedily, and then n > 1 is refused
LORA_RANK_SLOTS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks: the max_lora_rank values it accepts


# ------------------------------------------------------------------------------------------ requests


def is_greedy(params: SamplingConfig) -> bool:
    return params.temperature < GREEDY_BELOW


def request_seed(seed: int, prompt: int) -> int:
    """The seed of one prompt's request in a call seeded `seed`.

    vLLM seeds the n samples of a request seed, seed + 1, ... (parallel_sampling.py), so seeding prompts with
    consecutive numbers would give different prompts the same random draws; a hash of (seed, prompt) keeps every
    stream apart. 56 bits, so seed + n stays within int64."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{prompt}".encode(), digest_size=7).digest(), "little")


def sampling_kwargs(params: SamplingConfig, n: int, seed: int) -> dict[str, Any]:
    """`vllm.SamplingParams` keyword arguments for one prompt's n samples."""
    greedy = is_greedy(params)
    return {
        "n": 1 if greedy else n,  # vLLM refuses n > 1 when greedy: the one answer is repeated n times instead
        "temperature": 0.0 if greedy else params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,  # 0 disables top-k in vLLM too ("0 (or -1)"), as in SamplingConfig
        "seed": seed,
        "max_tokens": params.max_new_tokens,
        "logprobs": 0,  # just the sampled token's own log-probability at each step
        # Text is decoded here with the HF backend's tokenizer call, so both backends give verifiers the same text.
        "detokenize": False,
    }


# ------------------------------------------------------------------------------------------ results


def sampled_logprobs(ids: list[int], steps: Sequence[dict[int, Any]] | None) -> list[float]:
    """Per-token log-probabilities of the sampled tokens from vLLM's per-step {token id: Logprob} dicts."""
    if steps is None or len(steps) != len(ids):
        raise RuntimeError(f"vLLM returned log-probs for {0 if steps is None else len(steps)} of {len(ids)} sampled "
                           "tokens; every step needs one (SamplingParams.logprobs=0)")
    return [step[token].logprob for token, step in zip(ids, steps)]


def to_rollouts(outputs: Sequence[Any], n: int, greedy: bool, eos_id: int, version: int,
                decode: Callable[[list[list[int]]], list[str]]) -> Rollouts:
    """vLLM RequestOutputs (one per prompt, in prompt order) -> Rollouts in the HF backend's conventions.

    vLLM's token_ids hold the completion only and keep the EOS that stopped it (v1 check_stop); a sequence cut by
    max_tokens is `finished` for vLLM (finish_reason "length") but not here: finished means it ended with EOS."""
    from posttrain.workers.sampler import Rollouts  # here: sampler.py imports this module

    out = Rollouts([], [], [], [], [], version, n)
    for i, request in enumerate(outputs):
        seqs = sorted(request.outputs, key=lambda s: s.index)
        if len(seqs) != (1 if greedy else n):
            raise RuntimeError(f"vLLM returned {len(seqs)} completions for prompt {i}, expected {1 if greedy else n}")
        for seq in seqs * (n if greedy else 1):
            ids = list(seq.token_ids)
            out.prompt_index.append(i)
            out.completion_ids.append(ids)
            out.logprobs.append(sampled_logprobs(ids, seq.logprobs))
            out.finished.append(bool(ids) and ids[-1] == eos_id)
    out.text = decode(out.completion_ids)
    return out


# ------------------------------------------------------------------------------------------ versions, LoRA


def require_newer(served: int, version: int) -> None:
    """Refuse a weight update that is not newer than what is served (a stale or repeated push)."""
    if version <= served:
        raise WeightSyncError(f"weights version {version} refused: this sampler already serves version {served}, and "
                              "versions must strictly increase (a stale or repeated push?)")


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest LoRA rank in a peft adapter directory (its `r`, or a larger one in `rank_pattern`)."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([int(cfg["r"]), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())])


def lora_rank_slot(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of `rank`."""
    for slot in LORA_RANK_SLOTS:
        if rank <= slot:
            return slot
    raise PosttrainError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({LORA_RANK_SLOTS[-1]}): sync "
                         "merged weights instead of the adapter, or train a smaller rank")


def engine_kwargs(model: str, dtype: str, gpu_memory_utilization: float, sleep_mode: bool,
                  lora_rank: int | None) -> dict[str, Any]:
    """`vllm.LLM` arguments: the model plus EngineArgs fields."""
    kwargs: dict[str, Any] = {
        "model": model, "dtype": dtype, "gpu_memory_utilization": gpu_memory_utilization,
        # Raw log-probs (before temperature/top-k/p) are what the learners recompute; stated, not left to a default.
        "logprobs_mode": "raw_logprobs",
        # Without the model's generation_config.json: no sampling defaults and no extra EOS ids, so the engine stops
        # at the tokenizer's EOS only, as the HF backend does.
        "generation_config": "vllm",
        # Weight pushes call a named method of this class in each vLLM worker; a named method needs no pickled
        # callable (which vLLM's v1 engine refuses unless VLLM_ALLOW_INSECURE_SERIALIZATION is set).
        "worker_extension_cls": f"{__name__}.{WeightSyncExtension.__qualname__}",
        "enable_sleep_mode": sleep_mode,
    }
    if lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(lora_rank), max_loras=1)
    return kwargs


# ------------------------------------------------------------------------------------------ inside vLLM's workers


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Load Hugging Face-named tensors with the vLLM model's own `load_weights` (which maps them onto its fused
    layers), each moved to the model's device and float dtype first; returns the model parameters left unloaded.

    The check is the one vLLM's DefaultModelLoader makes at start-up (named parameters minus the names load_weights
    reports loaded): a push that silently misses a layer is the failure to catch. Quantized models skip it."""
    ref = next(p for p in model.parameters() if p.is_floating_point())
    weights = ((name, t.to(device=ref.device, dtype=ref.dtype if t.is_floating_point() else t.dtype))
               for name, t in state.items())  # lazily: one tensor at a time on the GPU
    loaded = model.load_weights(weights)
    if not strict or loaded is None:
        return []
    return sorted({name for name, _ in model.named_parameters()} - set(loaded))


class WeightSyncExtension:
    """Mixed into each vLLM worker class (EngineArgs.worker_extension_cls): `self` is the vLLM worker."""

    @torch.no_grad()
    def posttrain_load_weights(self, state: dict[str, torch.Tensor]) -> list[str]:
        quantized = getattr(getattr(self, "model_config", None), "quantization", None) is not None
        return load_into(self.model_runner.model, state, strict=not quantized)


# ------------------------------------------------------------------------------------------ the worker


class VLLMSamplerWorker:
    """SamplerWorker's interface on vLLM. Positional arguments as the HF backend's, then the vLLM options (Ray's
    spawn passes positional tuples): `weight_sync` "merged" (in-place pushes) or "adapter" (LoRA adapters loaded
    with load_weights), `sleep_mode` for colocated runs (sleep()/wake_up() free and restore the GPU), `lora_rank`:
    the adapter rank the engine reserves until an adapter needs more."""

    def __init__(self, model_path: str, dtype: str = "bfloat16", threads: int = 1, version: int = 0,
                 gpu_memory_utilization: float = 0.85, weight_sync: WeightSync = "merged", sleep_mode: bool = False,
                 lora_rank: int = 16):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise PosttrainError("cluster.sampler.backend is vllm but vLLM is not installed: pip install "
                                 "'posttrain[vllm]' on the GPU nodes, or use backend: hf") from None
        if weight_sync not in ("merged", "adapter"):
            raise PosttrainError(f"weight_sync must be 'merged' or 'adapter', not {weight_sync!r}")
        self.dtype, self.gpu_memory_utilization = dtype, gpu_memory_utilization
        self.weight_sync, self.sleep_mode, self.lora_rank = weight_sync, sleep_mode, lora_rank
        self.llm = None
        self.base: str | None = None  # the model the engine runs (the adapters' base in adapter mode)
        self.lora_slot = 0  # the engine's max_lora_rank (0: LoRA off)
        self.lora = None  # the LoRARequest served (adapter mode)
        self.next_lora_id = 1  # vLLM caches adapters by id: every adapter version gets a new one (ids start at 1)
        self.asleep = False
        self.unsynced: str | None = None  # why the served weights are unknown after a failed update; None: in sync
        self.version = version
        self.load_weights(model_path, version)

    # ---------------------------------------------------------------- weights

    def load_weights(self, model_path: str, version: int) -> int:
        """Serve the checkpoint at `model_path` as `version`: a LoRA adapter directory in adapter mode (swapped in
        under a new LoRA id, the engine kept), else a full model (a LoRA adapter is merged into its base first) on a
        new engine. Returns the version now served."""
        if self.llm is not None:
            require_newer(self.version, version)
        self._require_awake("load weights")
        try:
            if self.weight_sync == "adapter":
                self._serve_adapter(model_path, version)
            else:
                self._serve_merged(model_path)
        except BaseException:
            self.unsynced = f"loading weights version {version} from {model_path} failed"
            raise
        self.version, self.unsynced = version, None
        return version

    def update_weights(self, state: PushedWeights | dict[str, torch.Tensor], version: int) -> int:
        """Load the learners' pushed weights (base-model names, LoRA merged) in place in every vLLM worker, then drop
        the prefix cache (its KV blocks were computed with the old weights). Returns the version now served."""
        require_newer(self.version, version)
        state = state_of(state)
        if self.weight_sync == "adapter":
            raise WeightSyncError(f"weights version {version}: this sampler syncs LoRA adapters (weight_sync "
                                  "'adapter'); push the adapter directory with load_weights, not merged weights")
        if not state:
            raise WeightSyncError(f"weights version {version}: the push holds no tensors (not the learners' rank 0?)")
        self._require_awake("load weights")
        try:
            missing = sorted({name for worker in self.llm.collective_rpc("posttrain_load_weights", args=(state,))
                              for name in worker})
            if missing:
                raise WeightSyncError(f"weights version {version} left {len(missing)} of the sampler's parameters "
                                      f"unloaded ({', '.join(missing[:3])}...): is the learner training another "
                                      "architecture?")
            if self.llm.reset_prefix_cache() is False:
                raise WeightSyncError(f"weights version {version}: vLLM could not reset its prefix cache (requests "
                                      "still running?), so it could serve KV blocks of the old weights")
        except BaseException:
            self.unsynced = f"the update to weights version {version} failed part-way"
            raise
        self.version, self.unsynced = version, None
        return version

    def _serve_merged(self, model_path: str) -> None:
        from posttrain.models.load import is_adapter_dir, load_tokenizer, merge_adapter

        if is_adapter_dir(model_path):
            merged = f"{model_path.rstrip('/')}-merged"
            if not (Path(merged) / "config.json").exists():
                merge_adapter(model_path, merged, self.dtype)
            model_path = merged
        self._start_engine(model_path, lora_rank=None)
        self.tokenizer = load_tokenizer(model_path, padding_side="left")

    def _serve_adapter(self, model_path: str, version: int) -> None:
        from vllm.lora.request import LoRARequest

        from posttrain.models.load import adapter_base, is_adapter_dir, load_tokenizer

        if not is_adapter_dir(model_path):  # the start of a LoRA run: the base itself (a fresh adapter is a no-op)
            self._start_engine(model_path, lora_rank=self.lora_rank)
            self.tokenizer = load_tokenizer(model_path, padding_side="left")
            return
        base, rank = adapter_base(model_path), adapter_rank(model_path)
        if self.llm is None or base != self.base or rank > self.lora_slot:
            self._start_engine(base, lora_rank=max(rank, self.lora_rank))
        request = LoRARequest(lora_name=f"policy-v{version}", lora_int_id=self.next_lora_id, lora_path=str(model_path))
        self.next_lora_id += 1
        # Loaded now, not at the next generate, so a bad adapter fails this update rather than a later sample.
        if not self.llm.llm_engine.add_lora(request):
            raise WeightSyncError(f"weights version {version}: vLLM did not load the LoRA adapter {model_path}")
        old, self.lora = self.lora, request
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)  # may already be evicted (max_loras=1): no matter
        self.tokenizer = load_tokenizer(model_path, padding_side="left")

    def _start_engine(self, model: str, lora_rank: int | None) -> None:
        from vllm import LLM

        self.llm = None  # free the old engine's memory before the new one allocates its KV cache
        self.lora, self.asleep = None, False
        self.llm = LLM(**engine_kwargs(model, self.dtype, self.gpu_memory_utilization, self.sleep_mode, lora_rank))
        self.base, self.lora_slot = model, (lora_rank_slot(lora_rank) if lora_rank is not None else 0)

    # ---------------------------------------------------------------- colocated mode

    def sleep(self) -> None:
        """Free the GPU for the colocated learners: weights offloaded to CPU, KV cache dropped (vLLM sleep level 1).
        A no-op without sleep_mode, as on the HF backend."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        """Restore weights and KV cache after sleep(); the prefix cache starts empty."""
        if self.asleep:
            self.llm.wake_up()
            self.llm.reset_prefix_cache()
            self.asleep = False

    def _require_awake(self, what: str) -> None:
        if self.asleep:
            raise PosttrainError(f"the vLLM sampler is asleep (colocated mode) and cannot {what}: call wake_up() first")

    def _require_ready(self, what: str) -> None:
        self._require_awake(what)
        if self.unsynced:
            raise WeightSyncError(f"the sampler cannot {what}: {self.unsynced}, so the weights it holds are unknown "
                                  f"(still reported as version {self.version}); push the weights again")

    # ---------------------------------------------------------------- sampling

    def probe(self, prompt: list[int], completion: list[int]) -> tuple[int, list[float]]:
        """(version served, log p of each completion token): vLLM scores the whole sequence as a prompt."""
        from vllm import SamplingParams

        self._require_ready("score the parity probe")
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        (request,) = self.llm.generate([{"prompt_token_ids": prompt + completion}], sp, use_tqdm=False,
                                       lora_request=self.lora)
        # prompt_logprobs[t] holds the log-probability of token t given tokens < t (None at t = 0).
        steps = request.prompt_logprobs[len(prompt) :]
        return self.version, [step[tok].logprob for tok, step in zip(completion, steps)]

    def generate(self, prompts: list[list[int]], n: int, params: SamplingConfig, batch_size: int,
                 seed: int = 0) -> Rollouts:
        """n completions per tokenised prompt, prompt-major; vLLM schedules its own batches (batch_size is the HF
        backend's). Each prompt's request has a seed of its own derived from (seed, prompt)."""
        from vllm import SamplingParams

        self._require_ready("sample")
        requests = [SamplingParams(**sampling_kwargs(params, n, request_seed(seed, i))) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], requests, use_tqdm=False,
                                    lora_request=self.lora)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM answered {len(outputs)} of {len(prompts)} prompts")
        tok = self.tokenizer
        return to_rollouts(outputs, n, is_greedy(params), tok.eos_token_id, self.version,
                           lambda ids: tok.batch_decode(ids, skip_special_tokens=True))
