"""GPU memory per role and the plan's placement lines (torch-free: `posttrain run --dry-run` imports it).

Model states (ZeRO paper, Rajbhandari et al. 2020, sec. 3.1 and 5): mixed-precision Adam holds 2Ψ bytes of 16-bit
parameters, 2Ψ of 16-bit gradients and KΨ of optimizer states, K = 12 (fp32 master weights, momentum, variance);
fp32 training holds 4Ψ + 4Ψ + 8Ψ. ZeRO stage 1 partitions the optimizer states over the N_d data-parallel ranks,
stage 2 also the gradients, stage 3 also the parameters. With LoRA only the adapters (Φ parameters) have gradients
and optimizer states; the base weights stay frozen in the model dtype.

Activations of one micro-batch (Korthikanti et al. 2022, eq. 2, no recomputation): s·b·h·(34 + 5·a·s/h) bytes per
layer in 16-bit. The 5·a·s/h part is the s x s attention scores; transformers runs these models with SDPA, a fused
kernel that stores none, so it is left out: 34·s·b·h·L (x2 in fp32). The loss reads fp32 logits: s·b·V·4 bytes.
These are estimates: CUDA context, allocator fragmentation and DeepSpeed's buffers come on top.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from posttrain.cluster import COLOCATED, GROUPED, Demand, placement_strategy, stage_phases
from posttrain.errors import PosttrainError
from posttrain.recipe.schema import (DPOStage, LoraConfig, OnlineRLStage, Recipe, RestEMStage, RewardModelStage,
                                     SFTStage)

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KORTHIKANTI = 34  # bytes per s·b·h per layer of a 16-bit transformer layer, without the attention scores


class EstimateSkipped(Exception):
    """Why no memory estimate can be made (the plan says so and goes on)."""


# ---------------------------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a Llama-style decoder's config.json."""

    params: int  # Ψ
    layers: int  # L
    hidden: int  # h
    heads: int  # a
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # V
    source: str  # where Ψ was counted


def read_shape(path: str) -> ModelShape:
    """The shape of the model at `path`: a local directory (or LoRA adapter directory, read through its base) or a
    hub id whose config.json is in the local Hugging Face cache. Ψ is exact from safetensors headers when the
    weights are there, else computed from config.json."""
    directory = _model_dir(path)
    try:
        cfg = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EstimateSkipped(f"cannot read {directory / 'config.json'} ({exc})") from None
    shape = shape_from_config(cfg)
    exact = safetensors_params(directory)
    if exact is None:
        return shape
    return ModelShape(**{**vars(shape), "params": exact, "source": "safetensors headers"})


def _model_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        try:
            base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError) as exc:
            raise EstimateSkipped(f"LoRA adapter {p} names no readable base model ({exc})") from None
        return _model_dir(base)
    if (p / "config.json").exists():
        return p
    if p.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
        raise EstimateSkipped(f"no config.json in {path}")
    try:  # a hub id: the local cache only, a plan needs no network
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
    except Exception as exc:  # noqa: BLE001 (an unusable cache is a reason to skip, not to fail)
        cached, why = None, f" ({exc})"
    else:
        why = ""
    if not isinstance(cached, str):
        raise EstimateSkipped(f"{path!r} is a hub id whose config.json is not in the local Hugging Face cache{why} "
                              f"(`hf download {path} config.json` fetches it)")
    return Path(cached).parent


def shape_from_config(cfg: dict) -> ModelShape:
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if not isinstance(cfg.get(k), int)]
    if missing:
        raise EstimateSkipped(f"config.json has no {', '.join(missing)} (a Llama-style decoder config is expected)")
    if any(cfg.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise EstimateSkipped("mixture-of-experts configs are not modelled")
    h, a = cfg["hidden_size"], cfg["num_attention_heads"]
    kv, d = cfg.get("num_key_value_heads") or a, cfg.get("head_dim") or h // a
    shape = ModelShape(0, cfg["num_hidden_layers"], h, a, kv, d, cfg["intermediate_size"], cfg["vocab_size"],
                       "config.json shapes")
    # A missing tie_word_embeddings counts a separate output matrix: an estimate should err on the large side.
    params = config_params(shape, tied=bool(cfg.get("tie_word_embeddings", False)),
                           attention_bias=bool(cfg.get("attention_bias")), mlp_bias=bool(cfg.get("mlp_bias")))
    return ModelShape(**{**vars(shape), "params": params})


def config_params(s: ModelShape, tied: bool, attention_bias: bool = False, mlp_bias: bool = False) -> int:
    """Ψ of a Llama-style decoder: embeddings, per layer attention (q, k, v, o; grouped-query k and v), gated MLP
    (gate, up, down) and two RMSNorm weights, a final norm and (untied) the output matrix."""
    h, q, kv, i = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv + h if attention_bias else 0)
    mlp = 3 * h * i + (2 * i + h if mlp_bias else 0)
    embeddings = s.vocab * h * (1 if tied else 2)
    return embeddings + s.layers * (attention + mlp + 2 * h) + h


def safetensors_params(directory: Path) -> int | None:
    """Ψ counted from the headers of the directory's safetensors files (tied tensors are stored once); None when
    there are none."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        except (OSError, ValueError):
            return None
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def lora_params(shape: ModelShape, lora: LoraConfig) -> int:
    """Φ: each adapted (d_in -> d_out) linear of every layer adds A (r x d_in) and B (d_out x r)."""
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    unknown = [m for m in lora.target_modules if m not in dims]
    if unknown:
        raise EstimateSkipped(f"model.lora.target_modules: no Llama-style shape known for {', '.join(unknown)}")
    return shape.layers * lora.r * sum(sum(dims[m]) for m in lora.target_modules)


# ---------------------------------------------------------------------------------------------- learners
@dataclass(frozen=True)
class ModelStates:
    """Bytes per learner GPU of parameters, gradients and optimizer states."""

    params: int
    grads: int
    optimizer: int


def model_states(params: int, trainable: int, dtype: str, zero_stage: int, n_d: int,
                 backend: str = "deepspeed") -> ModelStates:
    """`params` Ψ in all (adapters included), `trainable` of them updated; partitioned over `n_d` ranks by stage."""
    w = DTYPE_BYTES[dtype]
    if backend == "torch":  # plain AdamW on the model's own tensors: two moments in the model dtype, no master copy
        k, zero_stage = 2 * w, 0
    else:  # DeepSpeed keeps fp32 master weights for 16-bit training
        k = 12 if w == 2 else 8
    return ModelStates(params=_shard(w * params, n_d if zero_stage >= 3 else 1),
                       grads=_shard(w * trainable, n_d if zero_stage >= 2 else 1),
                       optimizer=_shard(k * trainable, n_d if zero_stage >= 1 else 1))


def _shard(nbytes: int, n: int) -> int:
    return -(-nbytes // n)  # ceil: DeepSpeed pads partitions to equal size


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, dtype: str, scores: bool = False) -> int:
    """Korthikanti et al. 2022 per micro-batch, all layers; `scores`: eager attention also stores 5·a·s²·b."""
    per_layer = KORTHIKANTI * seq_len * micro_batch * shape.hidden
    if scores:
        per_layer += 5 * shape.heads * seq_len * seq_len * micro_batch
    return shape.layers * per_layer * DTYPE_BYTES[dtype] // 2


def logits_bytes(shape: ModelShape, seq_len: int, micro_batch: int) -> int:
    return seq_len * micro_batch * shape.vocab * 4  # fp32 for the loss


@dataclass(frozen=True)
class TrainShape:
    """One learner forward: sequences of seq_len tokens, micro_batch of them."""

    seq_len: int
    micro_batch: int
    reference: bool  # each learner holds a frozen full copy of the starting weights
    logits: bool  # the loss reads V-wide logits (False: a scalar head)


def train_shape(stage) -> TrainShape | None:
    """What a stage's learners run per forward; None for a stage without learners (eval)."""
    if isinstance(stage, SFTStage):
        return TrainShape(stage.max_length, stage.micro_batch_size, False, True)
    if isinstance(stage, RestEMStage):
        return TrainShape(stage.m_step.max_length, stage.m_step.micro_batch_size, False, True)
    if isinstance(stage, RewardModelStage):  # a pair is two sequences
        return TrainShape(stage.max_length, 2 * stage.micro_batch_size, False, False)
    if isinstance(stage, DPOStage):
        live = stage.reference == "live" and stage.loss.name != "simpo"
        return TrainShape(stage.max_length, 2 * stage.micro_batch_size, live, True)
    if isinstance(stage, OnlineRLStage):
        cfg = stage.objective_config()
        kl = cfg.kl_coef if stage.kind == "ppo" else cfg.beta
        return TrainShape(stage.max_prompt_length + stage.sampling.max_new_tokens, stage.micro_batch_size, kl > 0, True)
    return None


@dataclass(frozen=True)
class Need:
    """What one actor of a role holds on its GPU, by component (bytes)."""

    role: str
    parts: tuple[tuple[str, int], ...]
    note: str = ""  # what the figures assume

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)

    def breakdown(self) -> str:
        if len(self.parts) == 1:
            return self.parts[0][0]
        return " + ".join(f"{name} {gib(b)}" for name, b in self.parts)


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f}"


def learner_need(recipe: Recipe, shape: ModelShape, train: TrainShape, role: str = "learner") -> Need:
    """A learner (or the critic: full weights, a value head, no reference) per GPU."""
    lcfg, dtype = recipe.cluster.learner, recipe.model.dtype
    lora = recipe.model.lora if role == "learner" else None
    adapters = lora_params(shape, lora) if lora else 0
    states = model_states(shape.params + adapters, adapters or shape.params, dtype, lcfg.zero_stage, lcfg.actors,
                          lcfg.backend)
    parts = [("params", states.params), ("grads", states.grads), ("Adam", states.optimizer)]
    if train.reference and role == "learner":
        parts.append(("reference", DTYPE_BYTES[dtype] * shape.params))
    parts.append(("activations", activation_bytes(shape, train.seq_len, train.micro_batch, dtype)))
    if train.logits and role == "learner":
        parts.append(("logits", logits_bytes(shape, train.seq_len, train.micro_batch)))
    zero = f"ZeRO-{lcfg.zero_stage} over N_d={lcfg.actors}" if lcfg.backend == "deepspeed" else "torch AdamW"
    note = ("value head, sized as the policy; " if role == "critic" else "") + (
            f"{zero}, {dtype}, {shape.params / 1e9:.2f}B params from {shape.source}"
            + (f", LoRA {adapters / 1e6:.1f}M trainable" if lora else "")
            + f"; s={train.seq_len} x b={train.micro_batch} per micro-batch")
    return Need(role, tuple(parts), note)


# ---------------------------------------------------------------------------------------------- samplers
def weights_bytes(shape: ModelShape, dtype: str) -> int:
    return DTYPE_BYTES[dtype] * shape.params


def kv_bytes_per_token(shape: ModelShape, dtype: str) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * DTYPE_BYTES[dtype]  # K and V of every layer


def sampler_need(recipe: Recipe, shape: ModelShape) -> Need:
    """vLLM takes gpu_memory_utilization of the whole GPU (weights, then KV cache); hf generate holds the weights."""
    scfg, gpu = recipe.cluster.sampler, recipe.cluster.gpu_memory_gb
    weights = weights_bytes(shape, recipe.model.dtype)
    if scfg.backend != "vllm":
        return Need("sampler", (("weights", weights),), "hf generate: plus the KV cache of each batch")
    if gpu is None:
        return Need("sampler", (("weights", weights),), f"vLLM's KV cache gets the rest of "
                                                          f"{scfg.gpu_memory_utilization:g} of the GPU")
    engine = int(scfg.gpu_memory_utilization * gpu * GiB)
    kv = engine - weights
    if kv <= 0:
        raise PosttrainError(
            f"sampler: vLLM gets gpu_memory_utilization {scfg.gpu_memory_utilization:g} x cluster.gpu_memory_gb "
            f"{gpu:g} = {gib(engine)} GiB, which cannot hold the weights ({gib(weights)} GiB). Raise "
            "cluster.sampler.gpu_memory_utilization, use GPUs with more memory, or a smaller model")
    tokens = kv // kv_bytes_per_token(shape, recipe.model.dtype)
    return Need("sampler", ((f"vLLM {scfg.gpu_memory_utilization:g} x {gpu:g} GiB", engine),),
                f"weights {gib(weights)}, the KV cache gets the rest: {gib(kv)} GiB, ~{tokens:,} tokens")


# ---------------------------------------------------------------------------------------------- the plan
def resource_lines(recipe: Recipe, stage) -> list[str]:
    """The plan's placement and GPU-memory lines for `stage`, checked against cluster.gpu_memory_gb and the
    cluster's shape when set. [] when the stage's actors reserve no GPU: CPU-only plans are unchanged."""
    phases = stage_phases(recipe.cluster, stage)
    if not any(d.gpus for phase in phases for d in phase):
        return []
    check_nodes(recipe, stage.name, phases)
    lines = [f"  placement{f' (phase {n})' if len(phases) > 1 else ''}: "
             + "; ".join(placement(recipe, d) for d in phase) for n, phase in enumerate(phases, 1)]
    try:
        needs = role_needs(recipe, stage, read_shape(_stage_model(recipe, stage)))
    except EstimateSkipped as why:
        return lines + [f"  memory estimate skipped: {why}"]
    except PosttrainError as exc:
        raise PosttrainError(f"stage {stage.name!r}: {exc}") from None
    gpu = recipe.cluster.gpu_memory_gb
    for need in needs.values():
        of = f" of {gpu:g} GiB" if gpu else ""
        lines.append(f"  memory per {need.role} GPU: {need.breakdown()} = {gib(need.total)} GiB{of} ({need.note})")
    if gpu is None:
        lines.append("  (set cluster.gpu_memory_gb to check that this fits)")
    else:
        for phase in phases:
            check_memory(recipe, stage, phase, needs, gpu)
    return lines


def _stage_model(recipe: Recipe, stage) -> str:
    # "@stage" checkpoints keep the policy's architecture
    return stage.model if stage.model and not stage.model.startswith("@") else recipe.model.path


def role_needs(recipe: Recipe, stage, shape: ModelShape) -> dict[str, Need]:
    """The GPU roles of the stage and what one actor of each holds (critic and reward model sized as the policy)."""
    roles = {d.role for phase in stage_phases(recipe.cluster, stage) for d in phase if d.gpus}
    train = train_shape(stage)
    needs: dict[str, Need] = {}
    for role in ("learner", "critic"):
        if role in roles and train is not None:
            needs[role] = learner_need(recipe, shape, train, role)
    if "sampler" in roles:
        needs["sampler"] = sampler_need(recipe, shape)
    if "reward_model" in roles:
        needs["reward_model"] = Need("reward_model", (("weights", weights_bytes(shape, recipe.model.dtype)),),
                                     "plus one forward's activations")
    return needs


def placement(recipe: Recipe, d: Demand) -> str:
    """One role's bundles and Ray strategy, as cluster.spawn creates them."""
    strategy = placement_strategy(d, grouped=d.role in GROUPED)
    bundle = f"{{CPU {d.cpus:g}" + (f", GPU {d.gpus:g}}}" if d.gpus else "}")
    where = f"{d.role} {strategy} {d.actors} x {bundle}" if strategy else f"{d.role} {d.actors} x {bundle} (no group)"
    per_node = recipe.cluster.gpus_per_node
    if strategy == "PACK" and d.gpus and per_node:
        nodes = math.ceil(d.actors * d.gpus / per_node)
        where += " (one node)" if nodes == 1 else f" (spans {nodes} nodes: ZeRO's collectives cross the network)"
    return where


def check_nodes(recipe: Recipe, name: str, phases: list[list[Demand]]) -> None:
    """Refuse what cannot be placed on cluster.nodes x cluster.gpus_per_node GPUs."""
    c = recipe.cluster
    for phase in phases:
        for d in phase:
            if c.gpus_per_node and d.gpus > c.gpus_per_node:
                raise PosttrainError(f"stage {name!r}: each {d.role} actor reserves {d.gpus:g} GPUs but a node has "
                                     f"{c.gpus_per_node} (cluster.gpus_per_node). Lower cluster.{d.role}.gpus")
        need, have = sum(d.actors * d.gpus for d in phase), (c.nodes or 0) * (c.gpus_per_node or 0)
        if c.nodes and need > have + 1e-9:
            parts = " + ".join(str(d) for d in phase if d.gpus)
            raise PosttrainError(f"stage {name!r} needs {need:g} GPUs at once ({parts}) but cluster.nodes x "
                                 f"cluster.gpus_per_node = {have}. Lower cluster.<role>.actors or add nodes")


def check_memory(recipe: Recipe, stage, phase: list[Demand], needs: dict[str, Need], gpu: float) -> None:
    """Each GPU role's actor must fit its share of a GPU; colocated roles share one GPU, so their needs add up."""
    on_gpu = [d for d in phase if d.gpus and d.role in needs]
    colocated = [d for d in on_gpu if getattr(stage, "colocate", False) and d.role in COLOCATED]
    for group in [[d] for d in on_gpu if d not in colocated] + ([colocated] if colocated else []):
        _refuse_if_over(stage, [needs[d.role] for d in group], min(1.0, sum(d.gpus for d in group)), gpu, recipe)


def _refuse_if_over(stage, needs: list[Need], share: float, gpu: float, recipe: Recipe) -> None:
    total, budget = sum(n.total for n in needs), share * gpu * GiB
    if total <= budget:
        return
    have = (f"cluster.gpu_memory_gb is {gpu:g}" if share == 1 else
            f"its {share:g}-GPU share of cluster.gpu_memory_gb {gpu:g} is {gib(budget)} GiB")
    if len(needs) == 1:
        what = f"{needs[0].role} needs about {gib(total)} GiB per GPU ({needs[0].breakdown()})"
    else:
        what = (f"colocated {' + '.join(n.role for n in needs)} need about {gib(total)} GiB on each shared GPU ("
                + " + ".join(f"{n.role} {gib(n.total)}" for n in needs) + ")")
    raise PosttrainError(f"stage {stage.name!r}: {what} but {have}: {gib(total - budget)} GiB over. "
                         + advice(recipe, stage, [n.role for n in needs]))


def advice(recipe: Recipe, stage, roles: list[str]) -> str:
    """The knobs that lower what the over-full GPU holds, most effective first."""
    lcfg, train, out = recipe.cluster.learner, train_shape(stage), []
    if len(roles) > 1:
        out += ["a lower cluster.sampler.gpu_memory_utilization"] * ("sampler" in roles) + ["colocate: false"]
    if {"learner", "critic"} & set(roles):
        if lcfg.backend == "deepspeed" and lcfg.zero_stage < 3:
            # ZeRO-3 would not partition a live reference (schema rule): it goes first
            out.append("zero_stage 3" if not (train and train.reference) else
                       "reference: precomputed with zero_stage 3" if isinstance(stage, DPOStage) else
                       "zero_stage 3 with the KL weight at 0")
        if "learner" in roles and recipe.model.lora is None:
            out.append("LoRA")
        if lcfg.backend == "deepspeed" and lcfg.zero_stage:
            out.append("more learner actors (ZeRO partitions over N_d)")
        out.append("a smaller micro_batch_size")
    if roles == ["sampler"]:
        out.append("a lower cluster.sampler.gpu_memory_utilization with gpus: 1 per sampler")
    out.append("GPUs with more memory")
    return "Use " + ", ".join(out[:-1]) + f", or {out[-1]}"
