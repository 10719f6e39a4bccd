"""Gather / scatter one layer of a request's KV between the paged cache and the wire layout.

    cache  kv[layer]: [2, num_blocks_total, block_size, H, D]
    wire   layer    : [2, n,                block_size, H, D]   (n = len(block_ids), contiguous)

Transports that move less than a layer at a time (shm) work on some blocks of one layer's K or
V (`scatter_kv_blocks`), on CPU as rows of bytes (`byte_rows`, `BlockRuns`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from .base import KVTransferError, KVTransferMeta
from .layer_gate import LayerGate


def block_index(block_ids: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Block ids as the index tensor gather/scatter take.  # [n] int64 on `device`"""
    return torch.as_tensor(list(block_ids), dtype=torch.int64).to(device)


def gather_kv_layer(kv: torch.Tensor, layer: int, index: torch.Tensor) -> torch.Tensor:
    """kv[layer][:, index] as a new contiguous [2, n, bs, H, D] tensor (same device/dtype)."""
    return kv[layer].index_select(1, index)


class KVLayers(Iterator[torch.Tensor]):
    """What `iter_kv_layers` returns: the gathered layers, one per `next`, and also the cache and
    blocks they come from, so a transport that stages through its own buffer can gather straight
    into it (shm does) instead of copying each gathered layer once more.

    With a `gate` (layer_gate.py) the KV is still being computed: layer l is read only once the
    gate says the running step has written it (`wait_layer`, which `next` calls too)."""

    def __init__(self, kv: torch.Tensor, block_ids: Sequence[int], gate: LayerGate | None = None,
                 timeout_s: float | None = None):
        self.kv = kv  # the sender's whole cache [L, 2, num_blocks, bs, H, D]
        self.block_ids = tuple(int(b) for b in block_ids)
        self.index = block_index(self.block_ids, kv.device)  # [n] int64 on kv's device
        self.gate, self.timeout_s = gate, timeout_s
        self._next_layer = 0

    def wait_layer(self, layer: int, timeout_s: float | None = None) -> None:
        """Return once layer `layer` may be read (at once without a gate)."""
        if self.gate is not None:
            self.gate.wait(layer, self.timeout_s if timeout_s is None else timeout_s)

    def __next__(self) -> torch.Tensor:
        if self._next_layer >= self.kv.shape[0]:
            raise StopIteration
        self.wait_layer(self._next_layer)
        self._next_layer += 1
        return gather_kv_layer(self.kv, self._next_layer - 1, self.index)


def iter_kv_layers(kv: torch.Tensor, block_ids: Sequence[int], gate: LayerGate | None = None,
                   timeout_s: float | None = None) -> KVLayers:
    """Layers of `block_ids` one at a time, for `KVSender.send`: of a complete cache, or (with
    `gate`) of the step now computing them, each as soon as it is written (up to `timeout_s`)."""
    return KVLayers(kv, block_ids, gate, timeout_s)


def scatter_kv_layer(kv: torch.Tensor, layer: int, index: torch.Tensor, src: torch.Tensor) -> None:
    """kv[layer][:, index] = src, with src [2, n, bs, H, D] on any device."""
    kv[layer].index_copy_(1, index, src.to(kv.device, non_blocking=False))


def scatter_kv_blocks(kv: torch.Tensor, layer: int, half: int, index: torch.Tensor, src: torch.Tensor) -> None:
    """kv[layer, half][index] = src: some blocks of one layer's K (half 0) or V (half 1), with src
    [n, bs, H, D] on any device. The unit of transports that move less than a layer at a time."""
    kv[layer, half].index_copy_(0, index, src.to(kv.device, non_blocking=False))


def byte_rows(kv: torch.Tensor) -> np.ndarray | None:
    """A contiguous CPU cache as numpy uint8 [num_layers, 2, num_blocks, block_bytes], the same
    memory; None for any other cache. ``rows[l, h][ids] = src_rows`` then copies each block with
    one memcpy: ~3x faster than ``index_copy_`` on CPU, and numpy releases the GIL meanwhile."""
    if kv.device.type != "cpu" or kv.dim() != 6 or not kv.is_contiguous():
        return None
    return kv.view(*kv.shape[:3], -1).view(torch.uint8).numpy()


class BlockRuns:
    """A block-id list cut into runs of consecutive ids (3 4 5 | 9 | 12 13), so that a run of
    blocks moves with one slice copy (one memcpy per layer half) instead of block by block."""

    def __init__(self, block_ids: Sequence[int]):
        self.ids = np.asarray(block_ids, dtype=np.int64)  # [n]
        self._starts = [0, *(np.flatnonzero(np.diff(self.ids) != 1) + 1).tolist()]  # positions

    def within(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(position, first block id, length) of the runs' parts in positions [start, stop)."""
        i = bisect.bisect_right(self._starts, start) - 1
        runs, pos = [], start
        while pos < stop:
            end = min(stop, self._starts[i + 1] if i + 1 < len(self._starts) else len(self.ids))
            runs.append((pos, int(self.ids[pos]), end - pos))
            pos, i = end, i + 1
        return runs


def check_layer(meta: KVTransferMeta, layer: int, tensor: torch.Tensor) -> None:
    """Raise KVTransferError unless `tensor` is layer `layer` of `meta` on the wire."""
    if layer >= meta.num_layers:
        raise KVTransferError(f"more than num_layers={meta.num_layers} layers given", transfer_id=meta.transfer_id)
    if tuple(tensor.shape) != meta.layer_shape or tensor.dtype != meta.torch_dtype:
        raise KVTransferError(
            f"layer {layer} is {tuple(tensor.shape)} {tensor.dtype}, expected {meta.layer_shape} {meta.torch_dtype}",
            transfer_id=meta.transfer_id,
        )


def check_num_layers(meta: KVTransferMeta, num_sent: int) -> None:
    if num_sent != meta.num_layers:
        raise KVTransferError(f"{num_sent} layers given, meta says {meta.num_layers}", transfer_id=meta.transfer_id)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage viewed as a flat uint8 tensor (no copy)."""
    return tensor.contiguous().view(-1).view(torch.uint8)


def validated_layers(meta: KVTransferMeta, layers: Iterable[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, layer) pairs, each checked against `meta`; checks the count at the end."""
    num_sent = 0
    for i, t in enumerate(layers):
        check_layer(meta, i, t)
        num_sent = i + 1
        yield i, t
    check_num_layers(meta, num_sent)
