"""Attention backends: one small class per way of running attention over the paged KV cache.

A backend does two things, and the model code sees neither's insides::

    meta = backend.build(query_lens, context_lens, block_tables, block_size)   # once per step
    out = meta.attend(q, k, v, layer_cache)                                    # once per layer

``build`` turns the step's per-sequence lengths and block tables into whatever the kernel wants
(positions, the slot of every new token, gather indices, masks, a kernel's plan) on the device,
once for all layers; ``attend`` writes the layer's new K/V into the cache and attends. The model
(``models.llm``) reads ``meta.positions`` for its rotary embedding and calls ``meta.attend``; a
GPU backend with its own paged kernel (FlashInfer, flash-attn) or CUDA-graph capture of decode
steps plugs in here without touching it.

Backends are registered by name and imported only when chosen (``make_attention_backend``), so a
CPU machine never imports a GPU kernel. ``auto`` picks the best one the device can run.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

# name -> "module:Class"; each entry says which device types it runs on.
ATTENTION_BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch": ("models.paged_attention:TorchPagedAttention", ("cpu", "cuda")),
}


class StepAttention(ABC):
    """One step's attention metadata, shared by every layer of the step."""

    positions: torch.Tensor  # [T] int64 on the device: position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64 on the device: cache slot each new token's K/V goes to

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               layer_cache: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] of this step's new tokens; layer_cache [2, num_blocks,
        block_size, Hkv, D]. Writes k/v into the cache, returns the attention output [T, H, D]."""


class AttentionBackend(ABC):
    name: ClassVar[str]

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    @abstractmethod
    def build(self, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int) -> StepAttention:
        """Metadata of one packed step: sequence b has ``query_lens[b]`` new tokens (rows packed in
        the order given) and ``context_lens[b]`` tokens of KV after the step, in the blocks
        ``block_tables[b]``."""


def backends_for(device: torch.device | str) -> list[str]:
    """The registered backends that run on ``device``, best first."""
    kind = torch.device(device).type
    return [name for name, (_, kinds) in ATTENTION_BACKENDS.items() if kind in kinds]


def make_attention_backend(name: str, device: torch.device | str = "cpu") -> AttentionBackend:
    """The backend ``name`` (``auto``: the best one for ``device``); ValueError if it cannot run there."""
    available = backends_for(device)
    if name == "auto":
        if not available:
            raise ValueError(f"no attention backend runs on {device}")
        name = available[0]
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: auto, {', '.join(ATTENTION_BACKENDS)}")
    if name not in available:
        raise ValueError(f"attention backend {name!r} does not run on {torch.device(device).type}")
    module, _, cls = ATTENTION_BACKENDS[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)(device)
