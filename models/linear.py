"""How the language model's projections run: ``engine.linear_backend``.

``torch``: ``nn.Linear`` as loaded (``F.linear``, i.e. the BLAS sgemm/gemv).

``onednn`` (CPU): each decoder-layer projection's weight is reordered once, when the engine is
built, into oneDNN's blocked layout and every call runs oneDNN's matmul on it (the ops PyTorch's
own CPU inductor uses for frozen linears). A decode step multiplies a handful of rows by every
weight; with the weight pre-blocked that runs at up to 2x the speed of ``F.linear`` here (batch
8-32, measured in ``benchmarks/engine_throughput.py``), and as fast in long prefills.
The reorder keeps one copy of each weight (the original is released).

``auto``: ``onednn`` on a CPU where oneDNN has a kernel for the dtype (float32 always; bfloat16
needs AVX-512 or AVX-NE-CONVERT), else ``torch``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

LINEAR_BACKENDS = ("auto", "torch", "onednn")
# The row count oneDNN picks the weight layout for: decode's batches. Measured on the 98M model
# (2-core EPYC, AVX2), decode steps at batch 1 / 8 / 32 against hint 1: hint 8 is ~15% slower at
# batch 1 and 20-30% faster at 8 and 32; hint 32 is slower still at batch 1.
_BATCH_HINT = 8


def onednn_supports(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), _BATCH_HINT)
        return True
    except (RuntimeError, AttributeError):  # no kernel for this dtype on this CPU, or no such op
        return False


class OneDnnLinear(nn.Module):
    """``linear``'s computation on a weight reordered once for oneDNN (CPU only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _BATCH_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight_packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def resolve_linear_backend(name: str, dtype: torch.dtype, device: torch.device | str) -> str:
    device = torch.device(device)
    if name not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear backend {name!r}; expected one of {LINEAR_BACKENDS}")
    if name == "auto":
        return "onednn" if onednn_supports(dtype, device) else "torch"
    if name == "onednn" and not onednn_supports(dtype, device):
        raise ValueError(f"linear backend 'onednn' has no kernel for {dtype} on {device} here; use auto or torch")
    return name


def apply_linear_backend(layers: nn.Module, name: str, dtype: torch.dtype, device: torch.device | str) -> str:
    """Swap every ``nn.Linear`` under ``layers`` for the backend's module; returns the backend used."""
    backend = resolve_linear_backend(name, dtype, device)
    if backend == "onednn":
        targets = [(parent, attr, child) for parent in layers.modules()
                   for attr, child in parent.named_children() if type(child) is nn.Linear]
        for parent, attr, child in targets:
            setattr(parent, attr, OneDnnLinear(child))
        log.info("linear backend onednn: %d projections reordered", len(targets))
    return backend
