"""A selective diagonal state-space language model (the model class of adjoint sharding, arXiv 2501.00692).

Each of the K residual blocks normalises its input, x̂_t = RMSNorm(y_{k-1}^t), and runs

    a_t = sigmoid(W_a x̂_t + b_a)                 decay in (0, 1)^N     (the paper's diagonal A_t)
    B_t = diag(s_t) W_in,  s_t = W_s x̂_t + b_s   an input-dependent N x P matrix
    C_t = W_out diag(c_t), c_t = W_c x̂_t + b_c   an input-dependent P x N matrix
    h_t = a_t * h_{t-1} + B_t x̂_t,  h_0 = 0
    y_k^t = y_{k-1}^t + C_t h_t

then a final RMSNorm and the LM head. The per-token maps x -> (log a, B x̂, c) and (c, h) -> C h are the small
networks whose vector-Jacobian products the adjoint engines take (`SSMBlock.maps`, `SSMBlock.readout`).
Saved and loaded with the transformers conventions (config.json + model.safetensors, AutoModelForCausalLM).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from posttrain.errors import PosttrainError

IGNORE = -100


class SelectiveSSMConfig(PretrainedConfig):
    model_type = "posttrain_selective_ssm"

    def __init__(self, vocab_size: int = 64, hidden_size: int = 64, state_size: int = 16, num_layers: int = 2,
                 rms_norm_eps: float = 1e-6, min_timescale: float = 1.0, max_timescale: float = 1000.0,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = False, **kwargs):
        self.vocab_size, self.hidden_size, self.state_size, self.num_layers = vocab_size, hidden_size, state_size, num_layers
        self.rms_norm_eps, self.initializer_range = rms_norm_eps, initializer_range
        # Decays start at exp(-1/tau) with tau log-spaced over [min, max] tokens across the state channels (as
        # Mamba's dt init), so some channels remember for thousands of tokens from the first step.
        self.min_timescale, self.max_timescale = min_timescale, max_timescale
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


# ----------------------------------------------------------------------- scan
def linear_scan(a: torch.Tensor, u: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + u_t over dim 1 of (B, T, N), h_0 = 0: a two-level scan.

    Within chunks of c steps the recurrence runs for all chunks at once, then one pass carries the state across the
    T/c chunk boundaries: about c + T/c sequential steps instead of T, with exact (not log-space) arithmetic."""
    B, T, N = u.shape
    c = chunk or max(8, min(256, math.isqrt(T)))
    pad = -T % c
    if pad:
        a, u = F.pad(a, (0, 0, 0, pad), value=1.0), F.pad(u, (0, 0, 0, pad))
    M = (T + pad) // c
    a4, u4 = a.reshape(B, M, c, N), u.reshape(B, M, c, N)
    local, decay = torch.empty_like(u4), torch.empty_like(a4)  # scan from a zero state; products of a so far
    local[:, :, 0], decay[:, :, 0] = u4[:, :, 0], a4[:, :, 0]
    for j in range(1, c):
        torch.addcmul(u4[:, :, j], a4[:, :, j], local[:, :, j - 1], out=local[:, :, j])
        torch.mul(decay[:, :, j - 1], a4[:, :, j], out=decay[:, :, j])
    carry = torch.zeros(B, M, N, dtype=u.dtype, device=u.device)  # state entering each chunk
    for m in range(1, M):
        carry[:, m] = decay[:, m - 1, -1] * carry[:, m - 1] + local[:, m - 1, -1]
    h = local.add_(decay * carry[:, :, None])
    return h.reshape(B, M * c, N)[:, :T]


def reverse_scan(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """mu_t = d_t + a_{t+1} * mu_{t+1}, mu_T = d_T: the adjoint recurrence (the transpose of `linear_scan`)."""
    a_next = F.pad(a[:, 1:], (0, 0, 0, 1))
    return linear_scan(a_next.flip(1), d.flip(1)).flip(1)


def shift_right(h: torch.Tensor) -> torch.Tensor:
    """h_{t-1} at position t, with h_0 = 0."""
    return F.pad(h[:, :-1], (0, 0, 1, 0))


class _Scan(torch.autograd.Function):
    """Autograd through the scan that keeps only a and h (what a fused selective-scan kernel keeps)."""

    @staticmethod
    def forward(ctx, a, u):
        h = linear_scan(a, u)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        mu = reverse_scan(a, grad_h)
        return mu * shift_right(h), mu


def scan(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _Scan.apply(a, u) if torch.is_grad_enabled() and (a.requires_grad or u.requires_grad) else linear_scan(a, u)


# ---------------------------------------------------------------------- model
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class SSMBlock(nn.Module):
    def __init__(self, config: SelectiveSSMConfig):
        super().__init__()
        P, N = config.hidden_size, config.state_size
        self.eps = config.rms_norm_eps
        self.norm = nn.Parameter(torch.ones(P))
        self.a_proj = nn.Linear(P, N)  # the paper's 𝒜 (decay logits)
        self.s_proj = nn.Linear(P, N)  # ℬ: B_t = diag(s_t) W_in
        self.in_proj = nn.Linear(P, N, bias=False)
        self.c_proj = nn.Linear(P, N)  # 𝒞: C_t = W_out diag(c_t)
        self.out_proj = nn.Linear(N, P, bias=False)

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-token networks at layer input x: (log a_t, B_t x̂_t, c_t)."""
        xh = rms_norm(x, self.norm, self.eps)
        return F.logsigmoid(self.a_proj(xh)), self.s_proj(xh) * self.in_proj(xh), self.c_proj(xh)

    def readout(self, c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """C_t h_t."""
        return self.out_proj(c * h)

    def forward(self, x: torch.Tensor, detach_input: bool = False) -> torch.Tensor:
        log_a, u, c = self.maps(x.detach() if detach_input else x)
        return x + self.readout(c, scan(log_a.exp(), u))


class SelectiveSSMForCausalLM(PreTrainedModel):
    config_class = SelectiveSSMConfig
    base_model_prefix = "ssm"
    _no_split_modules = ["SSMBlock"]

    def __init__(self, config: SelectiveSSMConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(SSMBlock(config) for _ in range(config.num_layers))
        self.norm_f = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        if isinstance(module, SSMBlock):
            module.norm.fill_(1.0)
            cfg, N = self.config, module.a_proj.out_features
            tau = torch.logspace(math.log10(cfg.min_timescale), math.log10(cfg.max_timescale), N)
            a0 = torch.exp(-1.0 / tau)
            module.a_proj.bias.copy_(torch.log(a0) - torch.log1p(-a0))  # logit(a0): sigmoid(bias) = a0
            module.s_proj.bias.fill_(1.0)  # B_t starts as W_in, C_t as W_out
            module.c_proj.bias.fill_(1.0)
        if isinstance(module, SelectiveSSMForCausalLM):
            module.norm_f.fill_(1.0)

    def head(self, y: torch.Tensor) -> torch.Tensor:
        return self.lm_head(rms_norm(y, self.norm_f, self.config.rms_norm_eps))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, checkpoint_layers: bool = False,
                detach_layer_inputs: bool = False, **kwargs) -> CausalLMOutput:
        """detach_layer_inputs: each block's networks see a constant input (the residual stream still carries the
        gradient). Backprop of that graph is what the paper's multi-layer gradient (its Eq. 6) computes."""
        y = self.embed(input_ids)
        for block in self.blocks:
            if checkpoint_layers and torch.is_grad_enabled():
                y = torch.utils.checkpoint.checkpoint(block, y, detach_layer_inputs, use_reentrant=False)
            else:
                y = block(y, detach_layer_inputs)
        logits = self.head(y)
        loss = None if labels is None else next_token_loss(logits, labels)
        return CausalLMOutput(loss=loss, logits=logits)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts labels[t + 1] (the transformers convention); the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled next tokens."""
    targets = next_token_targets(labels)
    return F.cross_entropy(at_least_fp32(logits).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast for the loss; float64 stays float64 (the exactness tests need it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


AutoConfig.register(SelectiveSSMConfig.model_type, SelectiveSSMConfig)
AutoModelForCausalLM.register(SelectiveSSMConfig, SelectiveSSMForCausalLM)


def build_ssm_model(out_dir: str | Path, vocab_size: int, hidden_size: int, state_size: int, num_layers: int,
                    max_timescale: float = 1000.0, seed: int = 0) -> Path:
    """A freshly initialised model saved at `out_dir` (written beside it, then renamed: never half a model)."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    model = SelectiveSSMForCausalLM(SelectiveSSMConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                                       state_size=state_size, num_layers=num_layers,
                                                       max_timescale=max_timescale))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def load_ssm(path: str | Path, dtype: str = "float32") -> SelectiveSSMForCausalLM:
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, SelectiveSSMConfig):
        raise PosttrainError(f"{path} holds a {config.model_type!r} model, not a selective SSM "
                             f"({SelectiveSSMConfig.model_type}): longctx_sft trains the model of model.ssm")
    return SelectiveSSMForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
