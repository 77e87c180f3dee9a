"""The recipe schema: typed, closed dataclasses (unknown keys are errors).

Each section belongs to the code that uses it; defaults are the values a user
gets when a key is left out. `recipe.load` turns YAML into these types and
reports every problem with file, line and field path. Cross-field rules live
in each section's `problems()` method, which returns `(field, message)` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal, Union

from posttrain.algorithms.preference_config import LOSS_CONFIGS
from posttrain.algorithms.reward_augmented import DEFAULT_TEMPLATE as REWARD_AUGMENTED_TEMPLATE
from posttrain.algorithms.rl_config import GRPOConfig, PPOConfig
from posttrain.data.tasks.arithmetic import ArithmeticConfig
from posttrain.data.tasks.functions import FunctionsConfig
from posttrain.data.tasks.kv_recall import KVRecallConfig
from posttrain.models.tiny import TinyConfig

Problems = list[tuple[str, str]]  # (field name relative to the section, message)


# --------------------------------------------------------------------- model
@dataclass
class LoraConfig:
    """LoRA adapters via peft: only these parameters train and are saved."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def problems(self) -> Problems:
        out: Problems = []
        if self.r < 1:
            out.append(("r", "must be >= 1"))
        if not 0.0 <= self.dropout < 1.0:
            out.append(("dropout", "must be in [0, 1)"))
        if not self.target_modules:
            out.append(("target_modules", "must name at least one module (e.g. q_proj)"))
        return out


@dataclass
class SSMSpec:
    """Shape of the selective diagonal SSM (posttrain.longctx.ssm) built for long-context training."""

    vocab_size: int = 64
    hidden_size: int = 64  # P
    state_size: int = 16  # N
    num_layers: int = 2  # K
    max_timescale: float = 1000.0  # the slowest initial decay remembers about this many tokens
    seed: int = 0

    def problems(self) -> Problems:
        return [(k, "must be >= 1") for k in ("vocab_size", "hidden_size", "state_size", "num_layers")
                if getattr(self, k) < 1]


@dataclass
class ModelConfig:
    """The starting policy: a local Hugging Face directory or a hub id."""

    path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig | None = None
    # When set, the tiny Llama of the embedded default is built at `path` if it is not there yet.
    tiny: TinyConfig | None = None
    # When set, a selective state-space LM (longctx_sft stages) is built at `path` if it is not there yet.
    ssm: SSMSpec | None = None


# ---------------------------------------------------------------------- data
@dataclass
class DatasetConfig:
    """One named dataset: a built-in synthetic task, or rows loaded with `datasets`."""

    task: Literal["arithmetic", "functions", "kv_recall"] | None = None
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    functions: FunctionsConfig = field(default_factory=FunctionsConfig)  # synthetic code: write f(a, b)
    kv_recall: KVRecallConfig = field(default_factory=KVRecallConfig)  # long documents (token ids, longctx_sft)
    path: str | None = None  # local jsonl/parquet file or directory, or a hub id
    subset: str | None = None  # hub dataset configuration (e.g. "main" for openai/gsm8k)
    # prompt_completion / messages: generic rows. gsm8k (question, answer ending in "#### n") and
    # math (problem, solution with \boxed{}, optional answer): real benchmarks mapped to prompt/completion/answer.
    # humaneval / mbpp / stdio (APPS-style question + inputs/outputs): code problems checked in the sandbox.
    # Preference pairs (dpo stages): pairs (prompt/chosen/rejected strings), pairs_conversational (prompt as
    # messages), hh_rlhf (Anthropic HH transcripts, split at the longest common prefix).
    format: Literal["prompt_completion", "messages", "gsm8k", "math", "humaneval", "mbpp", "stdio",
                    "pairs", "pairs_conversational", "hh_rlhf"] = "prompt_completion"
    prompt_template: str | None = None  # gsm8k/math: "{question}" / "{problem}" filled in; None: a built-in one
    chat: bool = False  # gsm8k/math: render the prompt as a user turn with the tokenizer's chat template
    splits: dict[str, str] = field(default_factory=dict)  # split -> file (absolute, or relative to path)
    max_rows: int | None = None  # per split, after loading (handy for smoke runs)
    verifier: Literal["arithmetic", "arithmetic_steps", "math", "code"] | None = None  # answer checker; tasks and benchmarks bring their own

    def __post_init__(self) -> None:
        if self.verifier is None:
            by_task = {"arithmetic": "arithmetic", "functions": "code"}
            by_format = {"gsm8k": "math", "math": "math", "humaneval": "code", "mbpp": "code", "stdio": "code"}
            self.verifier = by_task.get(self.task) or by_format.get(self.format)

    def problems(self) -> Problems:
        out: Problems = []
        if (self.task is None) == (self.path is None):
            out.append(("task", "set exactly one of `task` (built-in) or `path` (files or hub id)"))
        if self.max_rows is not None and self.max_rows < 1:
            out.append(("max_rows", "must be >= 1"))
        return out


# ------------------------------------------------------------------- cluster
@dataclass
class LearnerConfig:
    """Learner actors: one torch.distributed group training with DeepSpeed ZeRO."""

    actors: int = 1
    cpus: float = 1.0  # per actor
    gpus: float = 0.0  # per actor
    backend: Literal["deepspeed", "torch"] = "deepspeed"
    zero_stage: Literal[0, 1, 2, 3] = 2

    def problems(self) -> Problems:
        out: Problems = []
        if self.actors < 1:
            out.append(("actors", "must be >= 1"))
        if self.backend == "torch" and self.actors != 1:
            out.append(("actors", "the plain-torch backend runs one actor; use backend: deepspeed for more"))
        if self.cpus <= 0:
            out.append(("cpus", "must be > 0"))
        return out


@dataclass
class SamplerConfig:
    """Sampler actors: Hugging Face generate (CPU/GPU) or vLLM (GPU)."""

    actors: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    backend: Literal["hf", "vllm"] = "hf"
    batch_size: int = 512  # prompts per generate call; large batches amortise per-token overhead
    # hf: "auto" decodes Llama-family models (llama, mistral, qwen2) with posttrain's lean loop (preallocated KV
    # cache, fused projections, finished rows dropped) and others with transformers' generate; "generate": always that
    decode: Literal["auto", "generate"] = "auto"
    # vllm: the fraction of the whole GPU's memory each engine takes (weights, then KV cache in the rest); lower it
    # when roles are colocated on the GPU.
    gpu_memory_utilization: float = 0.85

    def problems(self) -> Problems:
        out: Problems = []
        if self.actors < 1:
            out.append(("actors", "must be >= 1"))
        if self.backend == "vllm" and self.gpus <= 0:
            out.append(("gpus", "the vllm backend needs gpus > 0 per sampler actor"))
        if self.backend == "vllm" and self.decode != "auto":
            out.append(("decode", "chooses how the hf backend decodes; vLLM decodes with its own engine: remove it"))
        if self.batch_size < 1:
            out.append(("batch_size", "must be >= 1"))
        if not 0 < self.gpu_memory_utilization <= 1:
            out.append(("gpu_memory_utilization", "must be in (0, 1]"))
        return out


@dataclass
class VerifierConfig:
    actors: int = 1
    cpus: float = 0.5
    # Concurrent checks per actor (code: sandboxed programs at once; math: checker processes). Default: its
    # CPUs, at least 1. Verifying and sampling alternate, so on a small machine it may exceed its reservation.
    workers: int | None = None

    def problems(self) -> Problems:
        return [("workers", "must be >= 1")] if self.workers is not None and self.workers < 1 else []


@dataclass
class RewardModelServiceConfig:
    """RewardModelWorker actors: score responses with a trained reward model (online DPO labelling)."""

    actors: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    batch_size: int = 16  # sequences per forward pass

    def problems(self) -> Problems:
        return [(k, "must be >= 1") for k in ("actors", "batch_size") if getattr(self, k) < 1]


@dataclass
class ClusterConfig:
    """Where the actors run: an embedded local Ray, or an existing cluster."""

    address: str = "local"  # "local" starts Ray here; "auto" or "ray://host:10001" connects
    num_cpus: int | None = None  # CPUs of the local Ray (default: all cores of this machine)
    num_gpus: int = 0  # GPUs of the local Ray
    # For the plan (--dry-run) and its checks; unset: not checked. Memory of one GPU in GiB as vendors label it
    # (40: A100 40GB, 80: H100 80GB); the cluster's shape (a p4d.24xlarge node has 8 GPUs).
    gpu_memory_gb: float | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    reward_model: RewardModelServiceConfig = field(default_factory=RewardModelServiceConfig)

    def problems(self) -> Problems:
        out: Problems = []
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            out.append(("gpu_memory_gb", "must be > 0"))
        for key in ("nodes", "gpus_per_node"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                out.append((key, "must be >= 1"))
        if self.nodes is not None and self.gpus_per_node is None:
            out.append(("nodes", "set gpus_per_node too (the plan counts GPUs as nodes x gpus_per_node)"))
        return out


# ------------------------------------------------------------------ tracking
@dataclass
class TrackingConfig:
    output_dir: str = "runs"  # the run writes to <output_dir>/<name>/
    wandb: bool = False
    wandb_project: str = "posttrain"
    wandb_mode: Literal["offline", "online"] = "offline"
    wandb_entity: str | None = None
    tensorboard: bool = False
    report: bool = True  # report.html at the end of the run


# -------------------------------------------------------------------- stages
@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine (or constant) decay."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables

    def problems(self) -> Problems:
        out: Problems = []
        if self.lr <= 0:
            out.append(("lr", "must be > 0"))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(("betas", "must be two numbers in [0, 1), e.g. [0.9, 0.95]"))
        if self.warmup_steps < 0:
            out.append(("warmup_steps", "must be >= 0"))
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(("min_lr_ratio", "must be in [0, 1]"))
        if self.weight_decay < 0:
            out.append(("weight_decay", "must be >= 0"))
        if self.grad_clip < 0:
            out.append(("grad_clip", "must be >= 0 (0 disables clipping)"))
        return out


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    max_new_tokens: int = 64

    def problems(self) -> Problems:
        out: Problems = []
        if self.temperature < 0:
            out.append(("temperature", "must be >= 0 (0 = greedy)"))
        if not 0 < self.top_p <= 1:
            out.append(("top_p", "must be in (0, 1]"))
        if self.max_new_tokens < 1:
            out.append(("max_new_tokens", "must be >= 1"))
        if self.top_k < 0:
            out.append(("top_k", "must be >= 0 (0 disables top-k)"))
        return out


@dataclass
class SFTStage:
    """Supervised fine-tuning: loss on completion tokens only."""

    kind: Literal["sft"]
    data: str  # a name under `data:`
    name: str | None = None  # defaults to the kind; must be unique
    model: str | None = None  # default: the previous stage's checkpoint, else `model.path`; "@name": stage name's
    train_split: str = "train"
    eval_split: str | None = None  # held-out split for teacher-forced eval loss
    steps: int = 300
    batch_size: int = 32  # sequences per optimizer step, across all learner actors
    micro_batch_size: int = 16  # sequences per forward pass on one actor
    max_length: int = 256  # longer sequences are truncated (counted and logged)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = 100
    eval_rows: int = 256  # held-out rows for the eval loss
    save_every: int = 100  # checkpoint interval; the final step is always saved
    keep_last: int = 2  # checkpoints kept on disk (older ones are deleted)
    log_every: int = 10

    def problems(self) -> Problems:
        out: Problems = []
        for key in ("steps", "batch_size", "micro_batch_size", "max_length", "eval_every", "save_every", "log_every",
                    "keep_last", "eval_rows"):
            if getattr(self, key) < 1:
                out.append((key, "must be >= 1"))
        return out


@dataclass
class EvalStage:
    """Generation-based evaluation: greedy pass@1, unbiased pass@k and maj@k."""

    kind: Literal["eval"]
    data: str
    name: str | None = None
    model: str | None = None
    split: str = "test"
    max_problems: int | None = None
    greedy: bool = True  # greedy pass@1
    samples: int = 0  # samples per problem for pass@k / maj@k (0 skips sampling)
    pass_k: list[int] = field(default_factory=lambda: [1])
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 64  # for greedy decoding
    # Solution-cluster re-ranking (Liu et al. 2023) over the samples: keep the `rerank_top` largest answer
    # clusters and pick the best-scored solution among them (0 disables).
    rerank_top: int = 0
    rerank_scorer: Literal["likelihood"] = "likelihood"  # the policy's own mean token log-probability

    def problems(self) -> Problems:
        out: Problems = []
        if self.rerank_top < 0 or (self.rerank_top and not self.samples):
            out.append(("rerank_top", "re-ranking needs samples >= 1 (and rerank_top >= 1)"))
        if not self.greedy and self.samples == 0:
            out.append(("samples", "nothing to evaluate: set greedy: true or samples >= 1"))
        bad = [k for k in self.pass_k if k < 1 or (self.samples and k > self.samples)]
        if self.samples < 0:
            out.append(("samples", "must be >= 0"))
        if bad:
            out.append(("pass_k", f"each k must be in [1, samples={self.samples}]; got {bad}"))
        if self.max_problems is not None and self.max_problems < 1:
            out.append(("max_problems", "must be >= 1"))
        return out


@dataclass
class MStepConfig:
    """The M-step of ReST-EM: fine-tuning on the kept (verified) samples."""

    steps: int = 300
    batch_size: int = 64
    micro_batch_size: int = 32
    max_length: int = 256
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 10

    def problems(self) -> Problems:
        return [(k, "must be >= 1") for k in ("steps", "batch_size", "micro_batch_size", "max_length", "log_every")
                if getattr(self, k) < 1]


@dataclass
class RestEMStage:
    """ReST-EM (Singh et al. 2023): sample K solutions per problem, keep the verified ones, fine-tune, repeat."""

    kind: Literal["rest_em"]
    data: str
    name: str | None = None
    model: str | None = None
    train_split: str = "pool"  # problems with a final answer only; solutions come from the policy
    eval_split: str | None = "test"
    eval_data: str | None = None  # held-out problems from another dataset (default: `data`)
    iterations: int = 2
    samples_per_problem: int = 4  # K
    max_per_problem: int = 10  # cap on kept solutions per problem (paper: 10)
    problems_per_iteration: int | None = None  # a fresh random subset of the pool per E-step (None: all)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7, top_k=40, max_new_tokens=64))
    from_base: bool = True  # each M-step starts from the stage's input model (paper); False: from the last iterate
    m_step: MStepConfig = field(default_factory=MStepConfig)
    eval_max_problems: int | None = None
    eval_samples: int = 4  # samples per held-out problem for pass@K and maj@K (0: greedy pass@1 only)
    eval_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=64))

    def problems(self) -> Problems:
        out: Problems = []
        for key in ("iterations", "samples_per_problem", "max_per_problem"):
            if getattr(self, key) < 1:
                out.append((key, "must be >= 1"))
        if self.problems_per_iteration is not None and self.problems_per_iteration < 1:
            out.append(("problems_per_iteration", "must be >= 1"))
        if self.eval_samples < 0:
            out.append(("eval_samples", "must be >= 0"))
        return out


PAIR_FORMATS = {"pairs": "prompt_chosen_rejected", "pairs_conversational": "conversational", "hh_rlhf": "hh"}


@dataclass
class PreferenceLossConfig:
    """A DPO-family loss and its knobs; unset knobs take the method's defaults (algorithms/preference_config.py)."""

    name: Literal["dpo", "cdpo", "rdpo", "ipo", "rpo", "hdpo", "exo", "simpo", "kto"] = "dpo"
    beta: float | None = None
    label_smoothing: float | None = None  # cdpo
    flip_rate: float | None = None  # rdpo
    tau: float | None = None  # ipo
    eta: float | None = None  # rpo: weight of the chosen response's length-normalised NLL
    alpha: float | None = None  # hdpo (required there)
    epsilon: float | None = None  # exo
    gamma: float | None = None  # simpo
    desirable_weight: float | None = None  # kto: lambda_D (the chosen responses)
    undesirable_weight: float | None = None  # kto: lambda_U (the rejected responses)

    def knobs(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name" and getattr(self, f.name) is not None}

    def build(self):
        """The algorithm's own config object (validated there)."""
        return LOSS_CONFIGS[self.name](**self.knobs())

    def problems(self) -> Problems:
        allowed = {f.name for f in fields(LOSS_CONFIGS[self.name])}
        extra = [k for k in self.knobs() if k not in allowed]
        if extra:
            return [(k, f"{self.name} has no knob {k!r} (its knobs: {', '.join(sorted(allowed))})") for k in extra]
        try:
            self.build()
        except (TypeError, ValueError) as exc:
            return [("name", f"{self.name}: {exc}".replace("__init__() missing 1 required positional argument: ", "needs "))]
        return []


@dataclass
class OnlinePairsConfig:
    """Online / iterative DPO (DNO/INPO style): each round samples from the current policy, labels pairs with
    the data's verifier (correct vs incorrect) or a reward model (best vs worst scored), and trains with the
    round's starting policy as the reference."""

    rounds: int = 1
    samples_per_problem: int = 4
    max_pairs_per_problem: int = 1  # verifier: distinct verified vs distinct failed; reward model: i-th best vs i-th worst
    problems_per_round: int | None = None  # a fresh random subset of the split per round (None: all)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=64))
    label: Literal["verifier", "reward_model"] = "verifier"
    reward_model: str | None = None  # label: reward_model: "@stage" (a reward_model stage) or a directory
    min_margin: float = 0.0  # reward model: keep a pair only if its scores differ by more than this
    # XPO (Xie et al. 2024): + alpha * log pi(y~|x) on the reference's own samples (the pair's two responses,
    # averaged), which pushes probability away from where the reference already is: exploration. 0: off.
    xpo_alpha: float = 0.0

    def problems(self) -> Problems:
        out = [(k, "must be >= 1") for k in ("rounds", "samples_per_problem", "max_pairs_per_problem")
               if getattr(self, k) < 1]
        if (self.label == "reward_model") != (self.reward_model is not None):
            out.append(("reward_model", "set it (\"@stage\" or a directory) exactly when label: reward_model"))
        if self.min_margin < 0 or (self.min_margin and self.label != "reward_model"):
            out.append(("min_margin", "must be >= 0, and only applies to label: reward_model"))
        if self.xpo_alpha < 0:
            out.append(("xpo_alpha", "must be >= 0"))
        if self.samples_per_problem < 2:
            out.append(("samples_per_problem", "a pair needs at least 2 samples per problem"))
        if self.problems_per_round is not None and self.problems_per_round < 1:
            out.append(("problems_per_round", "must be >= 1"))
        return out


@dataclass
class ReferenceUpdateConfig:
    """TR-DPO (Gorbatovski et al. 2024): every tau optimizer steps move the reference towards the policy,
    soft (theta_ref <- alpha theta + (1 - alpha) theta_ref) or hard (theta_ref <- theta)."""

    mode: Literal["soft", "hard"] = "soft"
    alpha: float = 0.6
    tau: int = 512

    def problems(self) -> Problems:
        out: Problems = []
        if not 0 <= self.alpha <= 1:
            out.append(("alpha", "must be in [0, 1]"))
        if self.tau < 1:
            out.append(("tau", "must be >= 1"))
        return out


@dataclass
class RewardAugmentedConfig:
    """Reward-augmented DPO (Zhang et al. 2024): each scored pair becomes two goal-conditioned pairs (the prompt
    conditioned on the chosen score with y_w > y_l, and on the rejected score with y_l > y_w). Needs pair rows with
    score_chosen / score_rejected; at inference condition the prompt on the highest score."""

    template: str = REWARD_AUGMENTED_TEMPLATE  # str.format with {score} and {prompt}

    def problems(self) -> Problems:
        if "{score" not in self.template or "{prompt" not in self.template:
            return [("template", "must contain the {score} and {prompt} fields")]
        return []


@dataclass
class DPOStage:
    """Preference optimisation with a DPO-family loss: offline from a pair dataset, or online rounds."""

    kind: Literal["dpo"]
    data: str  # offline: a pair dataset (format pairs / pairs_conversational / hh_rlhf); online: problems
    name: str | None = None
    model: str | None = None
    train_split: str = "train"
    loss: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    online: OnlinePairsConfig | None = None  # set: pairs come from the policy and the verifier
    steps: int = 100  # optimizer steps (per round when online)
    batch_size: int = 32  # pairs per optimizer step, across all learner actors
    micro_batch_size: int = 8  # pairs per forward pass on one actor (2x sequences)
    max_length: int = 256  # pairs whose prompt + longer response exceed it are skipped (counted)
    # Padding-free: a micro-batch's sequences are laid end to end in rows of max_length tokens (each attends only
    # to itself). Needs a model that reads packed position_ids (Hugging Face Llama, Qwen2, Mistral, ...).
    packing: bool = True
    # precomputed: the reference's log-probs of every pair, once, before training (a reference model is never held);
    # live: each learner holds a frozen copy and scores every batch with it (needed by reference_update).
    reference: Literal["precomputed", "live"] = "precomputed"
    reference_update: ReferenceUpdateConfig | None = None  # TR-DPO's moving reference
    reward_augmented: RewardAugmentedConfig | None = None  # offline pairs with scores: condition on target scores
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-7, warmup_steps=10))
    skip_bad_rows: bool = True  # offline: skip malformed pairs (reported by row); False: stop at the first
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 2

    def problems(self) -> Problems:
        out = [(k, "must be >= 1") for k in ("steps", "batch_size", "micro_batch_size", "max_length", "log_every",
                                             "save_every", "keep_last") if getattr(self, k) < 1]
        if self.reference_update is not None and self.reference != "live":
            out.append(("reference_update", "a moving reference needs `reference: live`"))
        if self.reward_augmented is not None and self.online is not None:
            out.append(("reward_augmented", "applies to offline pairs with scores, not to online rounds"))
        if self.loss.name == "simpo" and self.reference == "live":
            out.append(("reference", "simpo uses no reference model: remove `reference: live`"))
        return out


@dataclass
class RewardModelStage:
    """A Bradley-Terry reward model on preference pairs: the policy's network with a scalar head, saved as a
    Hugging Face sequence-classification checkpoint. It does not replace the policy for the next stage; later
    stages use it by name (online dpo: `label: reward_model`, `reward_model: "@name"`)."""

    kind: Literal["reward_model"]
    data: str  # a pair dataset (format pairs / pairs_conversational / hh_rlhf)
    name: str | None = None
    model: str | None = None  # the network to start from (default: the current policy)
    train_split: str = "train"
    eval_split: str | None = None  # held-out pairs for pairwise accuracy; None: hold out eval_fraction of train
    eval_fraction: float = 0.05
    center_coefficient: float = 0.0  # eta (r_w + r_l)^2 keeps rewards near 0 (Eisenstein et al. 2023)
    steps: int = 100
    batch_size: int = 32  # pairs per optimizer step, across all learner actors
    micro_batch_size: int = 8  # pairs per forward pass on one actor (2x sequences)
    max_length: int = 256  # pairs whose prompt + longer response exceed it are skipped (counted)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=10))
    skip_bad_rows: bool = True
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 100
    keep_last: int = 2
    produces_policy: ClassVar[bool] = False

    def problems(self) -> Problems:
        out = [(k, "must be >= 1") for k in ("steps", "batch_size", "micro_batch_size", "max_length", "log_every",
                                             "eval_every", "save_every", "keep_last") if getattr(self, k) < 1]
        if not 0 <= self.eval_fraction < 1:
            out.append(("eval_fraction", "must be in [0, 1)"))
        if self.center_coefficient < 0:
            out.append(("center_coefficient", "must be >= 0"))
        return out


@dataclass
class RewardConfig:
    """Where an RL sample's scalar reward comes from."""

    source: Literal["verifier", "reward_model"] = "verifier"
    reward_model: str | None = None  # source: reward_model: "@stage" (a reward_model stage) or a directory
    correct: float = 1.0  # verifier: the reward of a verified response (a failed one gets 0); RLVR's alpha
    no_eos_penalty: float | None = None  # the reward of a response cut off before EOS instead of its score; None: as scored

    def problems(self) -> Problems:
        if (self.source == "reward_model") != (self.reward_model is not None):
            return [("reward_model", "set it (\"@stage\" or a directory) exactly when source: reward_model")]
        return []


@dataclass
class CriticConfig:
    """PPO's value model: a scalar head on the policy's network, trained with the clipped value loss."""

    model: str | None = None  # "@stage" or a directory; None: the reward model if the reward comes from one, else the policy
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))


@dataclass
class MonitorConfig:
    """Thresholds checked on every step's metrics: crossing one logs a plain warning saying what it likely means (once
    per crossing: again only after the metric came back within bounds). null disables a check."""

    kl_max: float | None = 0.5  # mean per-token KL(pi || pi_ref) (k3)
    entropy_min: float | None = None  # mean per-token entropy (nats) below which the policy is collapsing; task-dependent
    clip_frac_max: float | None = 0.3  # fraction of tokens with the PPO ratio outside 1 +- clip
    length_drift_max: float | None = 0.5  # |mean response length / first step's - 1|
    is_ratio_max: float | None = 5.0  # largest per-token pi_learner / pi_sampler: samples far off-policy
    log_z_max: float | None = None  # largest log-normaliser of the output logits (logit blow-up)

    def problems(self) -> Problems:
        return [(k, "must be > 0 (or null)") for k in ("kl_max", "clip_frac_max", "length_drift_max", "is_ratio_max")
                if getattr(self, k) is not None and getattr(self, k) <= 0]


@dataclass
class WeightSyncConfig:
    """The weight push to the samplers after every update, and its check."""

    # Largest allowed |log p_sampler - log p_learner| over the probe's tokens after a push; null: by dtype
    # (float32 1e-3, bfloat16/float16 0.25: two implementations of a half-precision forward differ that much).
    parity_tolerance: float | None = None
    probe_every: int = 1  # steps between parity probes (every push still checks versions)

    def problems(self) -> Problems:
        out: Problems = [("probe_every", "must be >= 1")] if self.probe_every < 1 else []
        if self.parity_tolerance is not None and self.parity_tolerance <= 0:
            out.append(("parity_tolerance", "must be > 0"))
        return out


@dataclass
class PtxConfig:
    """PPO-ptx (InstructGPT): the language-model loss on a supervised data set, mixed into every policy update with
    weight ppo.ptx_coef, against the alignment tax (the RL policy forgetting what it was trained on before)."""

    data: str  # a prompt/completion (or messages) data set under `data:`; the loss covers completion tokens
    split: str = "train"
    batch_size: int = 16  # sequences of it per optimizer step, across all learners
    max_length: int = 256  # longer sequences are truncated (counted and logged)

    def problems(self) -> Problems:
        return [(k, "must be >= 1") for k in ("batch_size", "max_length") if getattr(self, k) < 1]


@dataclass
class OnlineRLStage:
    """Online RL: PPO (critic, GAE, PPO-max stabilisers) or the critic-free GRPO / RLOO, with verifier or
    reward-model rewards. Each step: sample -> reward -> reference log-probs -> advantages -> updates -> weight push."""

    kind: Literal["ppo", "grpo", "rloo"]
    data: str  # problems (prompt + answer for a verifier), or a pair dataset's prompts with a reward model
    name: str | None = None
    model: str | None = None
    train_split: str = "train"
    eval_split: str | None = None  # held-out greedy pass@1 before training, every eval_every steps and at the end
    eval_problems: int | None = 500  # the first N held-out problems (None: all)
    eval_every: int = 10
    steps: int = 100  # RL steps: one rollout batch each
    prompts_per_step: int = 32
    samples_per_prompt: int = 8  # G: the group size of GRPO/RLOO
    mini_batches: int = 1  # optimizer steps per rollout batch and epoch (1: on-policy)
    epochs: int = 1  # passes over each rollout batch (PPO epochs)
    micro_batch_size: int = 16  # sequences per forward pass on one learner
    max_prompt_length: int = 256  # longer prompts are left out (counted, row numbers logged)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=128))
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig | None = None  # grpo / rloo knobs (default GRPOConfig())
    ppo: PPOConfig | None = None  # ppo knobs (default PPOConfig(): the PPO-max settings)
    critic: CriticConfig | None = None  # ppo only (default CriticConfig())
    ptx: PtxConfig | None = None  # ppo only: the data of the PPO-ptx term (its weight is ppo.ptx_coef)
    truncated_is: float | None = None  # cap C of truncated importance sampling between learner and sampler; null: off
    z_loss: float = 0.0  # coefficient of mean (log Z)^2 on the output logits (PaLM's z-loss); 0: measured only
    monitors: MonitorConfig = field(default_factory=MonitorConfig)
    sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    max_bad_steps: int = 3  # consecutive skipped (non-finite) updates before the run stops
    # Samplers (and the critic) share the learners' CPUs/GPUs, as sampling and training take turns: each colocated
    # role reserves its configured share divided by the number of colocated roles. false: each reserves its own.
    colocate: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0))
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 2

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def batch_size(self) -> int:  # sequences per optimizer step (one minibatch)
        return self.rollout_size // self.mini_batches

    def problems(self) -> Problems:
        out = [(k, "must be >= 1") for k in ("steps", "prompts_per_step", "samples_per_prompt", "mini_batches", "epochs",
                                             "micro_batch_size", "max_prompt_length", "eval_every", "log_every",
                                             "save_every", "keep_last", "max_bad_steps") if getattr(self, k) < 1]
        if out:
            return out
        if self.kind in ("grpo", "rloo") and self.samples_per_prompt < 2:
            out.append(("samples_per_prompt", f"{self.kind} compares samples of the same prompt: needs at least 2"))
        if self.rollout_size % self.mini_batches:
            out.append(("mini_batches", f"prompts_per_step x samples_per_prompt = {self.rollout_size} must split into "
                                        f"{self.mini_batches} equal minibatches"))
        if self.kind != "ppo" and (self.ppo is not None or self.critic is not None):
            out.append(("ppo" if self.ppo is not None else "critic", f"applies to kind ppo, not {self.kind}"))
        if self.kind == "ppo" and self.grpo is not None:
            out.append(("grpo", "applies to kinds grpo and rloo, not ppo (PPO's knobs go under `ppo`)"))
        ptx_coef = self.ppo.ptx_coef if self.ppo is not None else 0.0
        if ptx_coef and self.ptx is None:
            out.append(("ppo.ptx_coef", "PPO-ptx mixes in the language-model loss of a supervised data set: name it "
                                        "under `ptx: {data: NAME, split: train}` (or leave ptx_coef 0, the default)"))
        if self.ptx is not None and self.kind != "ppo":
            out.append(("ptx", f"PPO-ptx applies to kind ppo, not {self.kind}"))
        elif self.ptx is not None and not ptx_coef:
            out.append(("ptx", "set ppo.ptx_coef > 0 (the weight of this loss), or drop `ptx`"))
        if self.truncated_is is not None and self.truncated_is < 1:
            out.append(("truncated_is", "the cap C must be >= 1 (typical: 2)"))
        if self.z_loss < 0:
            out.append(("z_loss", "must be >= 0"))
        if self.eval_problems is not None and self.eval_problems < 1:
            out.append(("eval_problems", "must be >= 1 (or null for all)"))
        return out

    def objective_config(self):
        """The GRPO or PPO knobs in effect (the recipe's, or the defaults)."""
        return (self.ppo or PPOConfig()) if self.kind == "ppo" else (self.grpo or GRPOConfig())


@dataclass
class GradientConfig:
    """How a longctx_sft stage computes gradients (posttrain.longctx.adjoint)."""

    engine: Literal["adjoint", "autograd", "checkpoint", "literal"] = "adjoint"
    window: int | None = None  # T̄: truncated adjoint, dropping paths longer than this many tokens
    chunk: int = 256  # tokens per batched VJP: bounds the transient memory of the backward
    cotangent: Literal["per_layer", "top"] = "per_layer"  # "top": the paper's Eq. 6, not the gradient when K > 1
    workers: int = 0  # Ray workers sharing the VJP work (0: in the driver)
    split: Literal["layers", "time"] = "time"  # workers own blocks of layers, or chunks of time of every layer

    def problems(self) -> Problems:
        out: Problems = []
        if self.window is not None and self.window < 1:
            out.append(("window", "must be >= 1 (or null for the exact gradient)"))
        if self.chunk < 1:
            out.append(("chunk", "must be >= 1"))
        if self.workers < 0:
            out.append(("workers", "must be >= 0"))
        if self.engine in ("autograd", "checkpoint") and (self.window is not None or self.cotangent != "per_layer"):
            out.append(("engine", f"{self.engine} computes the plain gradient: window and cotangent apply to the "
                                  "adjoint and literal engines"))
        if self.workers and self.engine != "adjoint":
            out.append(("workers", f"only the adjoint engine is sharded across workers, not {self.engine}"))
        return out


@dataclass
class LongCtxSFTStage:
    """Long-context training of a selective SSM with adjoint-sharded gradients (loss on labelled tokens)."""

    kind: Literal["longctx_sft"]
    data: str
    name: str | None = None
    model: str | None = None
    train_split: str = "train"
    eval_split: str | None = "test"
    steps: int = 1000
    batch_size: int = 16  # documents per optimizer step
    gradient: GradientConfig = field(default_factory=GradientConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = 250
    eval_rows: int = 256  # held-out documents scored for answer accuracy
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 50

    def problems(self) -> Problems:
        return [(k, "must be >= 1") for k in ("steps", "batch_size", "eval_every", "eval_rows", "save_every",
                                              "keep_last", "log_every") if getattr(self, k) < 1]


Stage = Union[SFTStage, EvalStage, RestEMStage, DPOStage, RewardModelStage, OnlineRLStage, LongCtxSFTStage]
STAGE_KINDS: dict[str, type] = {"sft": SFTStage, "eval": EvalStage, "rest_em": RestEMStage, "dpo": DPOStage,
                                "reward_model": RewardModelStage, "ppo": OnlineRLStage, "grpo": OnlineRLStage,
                                "rloo": OnlineRLStage, "longctx_sft": LongCtxSFTStage}
STAGE_DESCRIPTIONS: dict[str, str] = {
    "sft": "supervised fine-tuning on prompt/completion pairs (loss on completion tokens)",
    "eval": "sample with the policy and score: greedy pass@1, unbiased pass@k, maj@k",
    "rest_em": "ReST-EM self-training: sample K, keep verified (capped, de-duplicated), fine-tune from base, repeat",
    "dpo": "DPO-family preference optimisation (dpo, cdpo, rdpo, ipo, rpo, hdpo, exo, simpo, kto): offline pairs or online rounds",
    "reward_model": "Bradley-Terry reward model on preference pairs (scalar head); held-out pairwise accuracy",
    "ppo": "PPO with a critic, GAE and the PPO-max stabilisers; verifier or reward-model rewards; verified weight sync",
    "grpo": "GRPO: group-normalised outcome advantages, clipped surrogate, k3 KL term; verified weight sync",
    "rloo": "RLOO: leave-one-out baseline over each prompt's samples, GRPO's clipped loss; verified weight sync",
    "longctx_sft": "long-context training of a selective SSM with adjoint-sharded gradients (exact or truncated)",
}


# -------------------------------------------------------------------- recipe
@dataclass
class Recipe:
    name: str
    model: ModelConfig
    data: dict[str, DatasetConfig]
    stages: list[Stage]
    seed: int = 0
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # Default stage names: the kind, numbered from the second stage of the same kind on.
        counts: dict[str, int] = {}
        for stage in self.stages:
            if stage.name is None:
                counts[stage.kind] = counts.get(stage.kind, 0) + 1
                stage.name = stage.kind if counts[stage.kind] == 1 else f"{stage.kind}{counts[stage.kind]}"

    def problems(self) -> Problems:
        out: Problems = []
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            out.append(("name", "must be a plain directory name (no slashes or spaces)"))
        if not self.stages:
            out.append(("stages", "a recipe needs at least one stage"))
        seen: set[str] = set()
        for i, stage in enumerate(self.stages):
            name = stage.name
            if name in seen:
                out.append((f"stages.{i}.name", f"duplicate stage name {name!r}; give each stage a unique `name`"))
            seen.add(name)
            trains = (SFTStage, DPOStage, RewardModelStage)
            train = stage if isinstance(stage, trains) else stage.m_step if isinstance(stage, RestEMStage) else None
            prefix = f"stages.{i}." if isinstance(stage, trains) else f"stages.{i}.m_step."
            if train is not None and train.batch_size % (self.cluster.learner.actors * train.micro_batch_size):
                per_step = self.cluster.learner.actors * train.micro_batch_size
                out.append((prefix + "batch_size",
                            f"{train.batch_size} must be a multiple of cluster.learner.actors ({self.cluster.learner.actors})"
                            f" x micro_batch_size ({train.micro_batch_size}) = {per_step}"))
            if isinstance(stage, OnlineRLStage):
                out += [(f"stages.{i}.{k}", m) for k, m in self._rl_problems(stage, i)]
            out += [(f"stages.{i}.{k}", m) for k, m in self._longctx_problems(stage)]
            online = stage.online if isinstance(stage, DPOStage) else None
            rl_reward = stage.reward if isinstance(stage, OnlineRLStage) else None
            needs_verifier = isinstance(stage, (EvalStage, RestEMStage)) or (online and online.label == "verifier") or (
                rl_reward is not None and (rl_reward.source == "verifier" or stage.eval_split is not None))
            pair_data = stage.data in self.data and self.data[stage.data].format in PAIR_FORMATS
            if needs_verifier and not pair_data and stage.data in self.data and self.data[stage.data].verifier is None:
                out.append((f"stages.{i}.data", f"{stage.kind} needs answers checked: set data.{stage.data}.verifier"))
            reads_pairs = isinstance(stage, RewardModelStage) or (isinstance(stage, DPOStage) and not online)
            prompts_of_pairs = (online is not None and online.label == "reward_model") or (
                rl_reward is not None and rl_reward.source == "reward_model")  # pair data as a prompt set
            if reads_pairs and stage.data in self.data and not pair_data:
                what = "reward_model" if isinstance(stage, RewardModelStage) else "offline dpo"
                out.append((f"stages.{i}.data", f"{what} needs a pair dataset: data.{stage.data}.format one of "
                                                f"{', '.join(PAIR_FORMATS)}" + ("" if isinstance(stage, RewardModelStage)
                                                else " (or set `online` to make pairs from samples)")))
            if pair_data and not (reads_pairs or prompts_of_pairs):
                out.append((f"stages.{i}.data", f"data.{stage.data} holds preference pairs: only an offline dpo stage, "
                                                "a reward_model stage or online dpo labelled by a reward model reads it"))
            if isinstance(stage, DPOStage) and stage.reference == "live" and self.cluster.learner.zero_stage == 3:
                out.append((f"stages.{i}.reference", "a live reference is a full copy on each learner, which ZeRO-3 "
                                                     "would not partition: use `precomputed` or zero_stage <= 2"))
            if isinstance(stage, DPOStage) and stage.reference_update is not None and self.model.lora is not None:
                out.append((f"stages.{i}.reference_update", "TR-DPO mixes full weights into the reference; with LoRA "
                                                            "only adapters train: drop model.lora or the update"))
            rm = online.reward_model if online else rl_reward.reward_model if rl_reward else None
            if rm and rm.startswith("@") and not any(s.name == rm[1:] and isinstance(s, RewardModelStage)
                                                     for s in self.stages[:i]):
                where = "online.reward_model" if online else "reward.reward_model"
                out.append((f"stages.{i}.{where}", f"{rm!r} must name an earlier reward_model stage"))
            if isinstance(stage, EvalStage) and stage.rerank_top and self.data.get(stage.data) is not None \
                    and self.data[stage.data].verifier == "code":
                out.append((f"stages.{i}.rerank_top", "re-ranking clusters equal final answers; programs have none "
                            "(the code verifier judges by tests): remove rerank_top"))
            if stage.model and stage.model.startswith("@") and stage.model[1:] not in seen - {name}:
                out.append((f"stages.{i}.model", f"{stage.model!r} must name an earlier stage (e.g. '@sft') whose "
                                                 "checkpoint this stage starts from"))
            elif stage.model and stage.model.startswith("@") and not isinstance(stage, RewardModelStage) and any(
                    s.name == stage.model[1:] and isinstance(s, RewardModelStage) for s in self.stages[:i]):
                out.append((f"stages.{i}.model", f"{stage.model!r} is a reward model, not a policy: name it in "
                                                 "`online.reward_model` of a dpo stage instead"))
            if getattr(stage, "eval_data", None) and stage.eval_data not in self.data:
                out.append((f"stages.{i}.eval_data", f"unknown dataset {stage.eval_data!r}"))
            if stage.data not in self.data:
                known = ", ".join(sorted(self.data)) or "none"
                out.append((f"stages.{i}.data", f"unknown dataset {stage.data!r} (defined under data: {known})"))
        return out

    def _longctx_problems(self, stage) -> Problems:
        """An SSM trains only in longctx_sft stages, on token-id documents; the other stages need a Llama."""
        data = self.data.get(stage.data)
        long_data = data is not None and data.task == "kv_recall"
        if isinstance(stage, LongCtxSFTStage):
            out: Problems = []
            if data is not None and not long_data:
                out.append(("data", f"longctx_sft reads token-id documents: data.{stage.data}.task must be kv_recall"))
            if self.model.tiny is not None:
                out.append(("kind", "longctx_sft trains a selective SSM: set model.ssm instead of model.tiny"))
            return out
        if self.model.ssm is not None:
            return [("kind", f"model.ssm is a state-space model for longctx_sft stages; {stage.kind} needs a "
                             "transformers causal LM (drop model.ssm)")]
        if long_data:
            return [("data", f"data.{stage.data} (kv_recall) holds token-id documents: only longctx_sft reads them")]
        return []

    def _rl_problems(self, stage: OnlineRLStage, i: int) -> Problems:
        out: Problems = []
        per_step = self.cluster.learner.actors * stage.micro_batch_size
        if stage.batch_size % per_step:
            out.append(("micro_batch_size", f"each minibatch of {stage.batch_size} sequences (prompts_per_step x "
                        f"samples_per_prompt / mini_batches) must be a multiple of cluster.learner.actors "
                        f"({self.cluster.learner.actors}) x micro_batch_size ({stage.micro_batch_size}) = {per_step}"))
        cfg = stage.objective_config()
        kl = cfg.kl_coef if stage.kind == "ppo" else cfg.beta
        if kl and self.cluster.learner.zero_stage == 3:
            out.append((stage.kind, "the KL term needs the reference policy, a full frozen copy on each learner, which "
                                    "ZeRO-3 would not partition: use zero_stage <= 2 or set the KL weight to 0"))
        ptx = stage.ptx
        if ptx is not None:
            gas = stage.batch_size // per_step
            data = self.data.get(ptx.data)
            if data is None:
                out.append(("ptx.data", f"unknown dataset {ptx.data!r} (defined under data: "
                                        f"{', '.join(sorted(self.data)) or 'none'})"))
            elif data.format in PAIR_FORMATS or data.task == "kv_recall":
                out.append(("ptx.data", f"data.{ptx.data} must hold prompt/completion rows (the language-model loss "
                                        "covers the completions), not preference pairs or token-id documents"))
            if 1 <= ptx.batch_size < self.cluster.learner.actors * gas:
                out.append(("ptx.batch_size", f"the {self.cluster.learner.actors * gas} micro-batches of an "
                                              f"update take a share each: at least {self.cluster.learner.actors * gas}"))
        critic = stage.critic.model if stage.critic else None
        if critic and critic.startswith("@") and critic[1:] not in {s.name for s in self.stages[:i]}:
            out.append(("critic.model", f"{critic!r} must name an earlier stage"))
        return out

