"""Decoder-only language model (Llama and Qwen2 families) over a paged KV cache.

Parameter names match the Hugging Face checkpoints (``model.layers.N.self_attn.q_proj.weight``,
``lm_head.weight``, ...) so weights load by name. The numerics follow ``transformers``' reference
implementation step for step (RMSNorm in float32, RoPE cos/sin cast to the activation dtype,
SwiGLU), which is what makes greedy outputs token-exact against ``generate``.

The forward takes *embeddings*, not ids: the caller embeds text tokens with ``embed`` and splices
media embeddings in at placeholder positions before calling ``forward``.

Weights load under the checkpoint's names (separate q/k/v and gate/up projections); the loader
then fuses them (``CausalLM.fuse_projections``): one matmul for q, k and v and one for gate and up
per layer, as vLLM's ``QKVParallelLinear`` / ``MergedColumnParallelLinear`` do. Each output
column is still the dot product of the same weight row with the same input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from models.attention_backend import StepAttention

SUPPORTED_TEXT_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")
_QK_NORM_TYPES = ("qwen3", "qwen3_vl_text")  # Qwen3: RMSNorm over each head's q and k before RoPE
_INTERLEAVED_MROPE_TYPES = ("qwen3_vl_text",)  # always interleaved, mrope_section defaulting to [24, 20, 20]
_QKV_BIAS_TYPES = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")  # Qwen2 (and the Qwen2-VL LM): q/k/v bias, none on o_proj


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE with every static scaling type transformers knows (linear, llama3, yarn, longrope)."""

    def __init__(self, config):
        super().__init__()
        with torch.device("cpu"):  # real values even when the model is built on the meta device
            inv_freq, self.attention_scaling = self._init_inv_freq(config)
        # Kept in float32 outside the module's buffers so casting the model to bf16 never rounds it
        # (transformers keeps it in float32 too); moved to the compute device on first use.
        self.inv_freq = inv_freq.float()
        # M-RoPE (Qwen2-VL family): frequency f rotates by the position on axis mrope_axis[f]
        # (temporal, height, width sections in order); positions then come as [3, T].
        params = getattr(config, "rope_parameters", None) or {}
        section = params.get("mrope_section")
        interleaved = config.model_type in _INTERLEAVED_MROPE_TYPES
        if interleaved:
            section = section or [24, 20, 20]
        elif section is not None and params.get("mrope_interleaved"):
            raise ValueError(f"interleaved M-RoPE is implemented for {', '.join(_INTERLEAVED_MROPE_TYPES)} only, "
                             f"not {config.model_type!r}")
        if section is not None and sum(section) != self.inv_freq.numel():
            raise ValueError(f"mrope_section {section} does not cover the {self.inv_freq.numel()} rotary frequencies")
        self.mrope_axis = None if section is None else _mrope_axes(section, interleaved)

    @staticmethod
    def _init_inv_freq(config) -> tuple[torch.Tensor, float]:
        params = getattr(config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        elif rope_type == "dynamic":
            raise ValueError("rope_type 'dynamic' rescales with sequence length and is not supported")
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}")
        return inv_freq, scaling

    @property
    def is_mrope(self) -> bool:
        return self.mrope_axis is not None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] (or [3, T] with M-RoPE) -> cos, sin: [T, 1, head_dim] (broadcast over heads)
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
            if self.mrope_axis is not None:
                self.mrope_axis = self.mrope_axis.to(positions.device)
        if positions.dim() == 2:  # [3, T]: each frequency takes the position of its axis
            freqs = positions.index_select(0, self.mrope_axis).t().float() * self.inv_freq[None, :]
        else:
            freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]


def _mrope_axes(section: list[int], interleaved: bool) -> torch.Tensor:
    """Axis (0 temporal, 1 height, 2 width) whose position rotates each frequency: contiguous
    sections (Qwen2-VL, Qwen2.5-VL), or interleaved t, h, w, t, h, w, ... over the first
    ``3 * section[1|2]`` frequencies with the rest temporal (Qwen3-VL). A real CPU tensor even when
    the model is built on the meta device."""
    if not interleaved:
        axes = [i % 3 for i, n in enumerate(section) for _ in range(n)]
    else:
        axes = [0] * sum(section)
        for axis in (1, 2):
            for j in range(axis, section[axis] * 3, 3):
                axes[j] = axis
    return torch.tensor(axes, dtype=torch.int64, device="cpu")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        # Qwen2 has q/k/v bias; Llama has `attention_bias` (False in every released checkpoint).
        qkv_bias = config.model_type in _QKV_BIAS_TYPES or getattr(config, "attention_bias", False)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden,
                                bias=getattr(config, "attention_bias", False) and config.model_type not in _QKV_BIAS_TYPES)
        self.qkv_proj: nn.Linear | None = None  # q, k, v in one, once fuse() ran
        self.q_norm = self.k_norm = None
        if config.model_type in _QK_NORM_TYPES:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def fuse(self) -> None:
        self.qkv_proj = _fused_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, layer_cache, meta: StepAttention) -> torch.Tensor:
        # x: [T, hidden]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)  # [T, ...] views
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = meta.attend(q, k, v, layer_cache)  # [T, H, D]
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACT2FN[config.hidden_act]
        self.gate_up_proj: nn.Linear | None = None  # gate and up in one, once fuse() ran

    def fuse(self) -> None:
        self.gate_up_proj = _fused_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def _fused_linear(*parts: nn.Linear) -> nn.Linear:
    """One Linear whose output is ``parts``' outputs side by side (weights concatenated by row)."""
    has_bias = parts[0].bias is not None
    w = parts[0].weight
    fused = nn.Linear(w.shape[1], sum(p.weight.shape[0] for p in parts), bias=has_bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if has_bias:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused.requires_grad_(False)


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, layer_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class _DecoderStack(nn.Module):
    """The ``model.*`` half of a checkpoint: embeddings, layers, final norm."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    """Llama / Qwen2 causal LM. ``forward`` returns hidden states; ``compute_logits`` projects."""

    def __init__(self, config):
        super().__init__()
        if config.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
            raise ValueError(
                f"unsupported language model type {config.model_type!r}; "
                f"supported: {', '.join(SUPPORTED_TEXT_MODEL_TYPES)}"
            )
        self.config = config
        self.model = _DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Fuse each layer's q/k/v and gate/up projections (after the weights are loaded)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    @property
    def is_mrope(self) -> bool:
        """Positions are [3, T] (temporal, height, width), given per step by the runner."""
        return self.model.rotary_emb.is_mrope

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [T, hidden], packed new tokens of the batch
        meta: StepAttention,
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, Hkv, D]
        positions: torch.Tensor | None = None,  # [3, T] M-RoPE positions; None: meta.positions
        deepstack: tuple[torch.Tensor, torch.Tensor] | None = None,  # (rows [M], [M, k * hidden])
        on_layer: Callable[[int], None] | None = None,  # called with i once layer i's KV is in kv_cache
    ) -> torch.Tensor:  # [T, hidden], after the final norm
        x = inputs_embeds
        cos, sin = self.model.rotary_emb(meta.positions if positions is None else positions, x.dtype)
        hidden = x.shape[-1]
        num_stacked = 0 if deepstack is None else deepstack[1].shape[-1] // hidden
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, kv_cache[i], meta)
            if i < num_stacked:  # DeepStack (Qwen3-VL): tower layer i's features join after LM layer i
                rows = deepstack[0]
                x = x.clone()
                x[rows] = x[rows] + deepstack[1][:, i * hidden:(i + 1) * hidden]
            if on_layer is not None:
                on_layer(i)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> logits [N, vocab] in float32 for sampling.
        return F.linear(hidden, self.lm_head.weight).float()
