"""Gather / scatter one layer of a request's KV between the paged cache and the wire layout.

    cache  kv[layer]: [2, num_blocks_total, block_size, H, D]
    wire   layer    : [2, n,                block_size, H, D]   (n = len(block_ids), contiguous)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from .base import KVTransferError, KVTransferMeta


def block_index(block_ids: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Block ids as the index tensor gather/scatter take.  # [n] int64 on `device`"""
    return torch.as_tensor(list(block_ids), dtype=torch.int64).to(device)


def gather_kv_layer(kv: torch.Tensor, layer: int, index: torch.Tensor) -> torch.Tensor:
    """kv[layer][:, index] as a new contiguous [2, n, bs, H, D] tensor (same device/dtype)."""
    return kv[layer].index_select(1, index)


def iter_kv_layers(kv: torch.Tensor, block_ids: Sequence[int]) -> Iterator[torch.Tensor]:
    """Layers of `block_ids` one at a time, for `KVSender.send` when the cache is complete.

    When prefill computes layer by layer, yield `gather_kv_layer(kv, l, index)` from the model
    loop instead, right after layer l's KV is written.
    """
    index = block_index(block_ids, kv.device)
    for layer in range(kv.shape[0]):
        yield gather_kv_layer(kv, layer, index)


def scatter_kv_layer(kv: torch.Tensor, layer: int, index: torch.Tensor, src: torch.Tensor) -> None:
    """kv[layer][:, index] = src, with src [2, n, bs, H, D] on any device."""
    kv[layer].index_copy_(1, index, src.to(kv.device, non_blocking=False))


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
