"""KV transport over the Ray object store (handoff style: send, then recv with the ticket).

The sender `ray.put`s each layer as a numpy array ([2, n, bs, H, D]; bfloat16 travels as a
uint16 view since numpy has no bfloat16) and returns a ticket whose payload is the ObjectRefs,
one per layer, in order. The lead passes the ticket to the decode actor; its `recv` `ray.get`s
the layers under the deadline and scatters them. No communicator and no pairing: `connect`
only records the peer. The objects live while the ticket does (Ray reference counting); they
are lost, and `recv` fails, if the sending worker dies before the receiver fetched them.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import ray
import torch

from .base import (
    Deadline,
    KVReceiver,
    KVSender,
    KVSendResult,
    KVTicket,
    KVTransferError,
    KVTransferMeta,
    KVTransferTimeout,
)
from .layout import block_index, scatter_kv_layer, validated_layers


def layer_to_numpy(layer: torch.Tensor) -> np.ndarray:
    t = layer.detach().cpu().contiguous()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def layer_from_numpy(array: np.ndarray, meta: KVTransferMeta) -> torch.Tensor:
    with warnings.catch_warnings():  # object-store arrays are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(array)
    if meta.torch_dtype == torch.bfloat16 and t.dtype == torch.uint16:
        t = t.view(torch.bfloat16)
    if tuple(t.shape) != meta.layer_shape or t.dtype != meta.torch_dtype:
        raise KVTransferError(
            f"layer object is {tuple(t.shape)} {t.dtype}, expected {meta.layer_shape} {meta.torch_dtype}",
            transfer_id=meta.transfer_id,
        )
    return t


class RayKVSender(KVSender):
    transport = "ray"
    recv_during_send = False

    def __init__(self, sender_id: str, *, timeout_s: float = 30.0):
        super().__init__(sender_id, timeout_s=timeout_s)
        self._peers: dict[str, dict[str, Any]] = {}

    def connect(self, peer_id: str, peer_info: dict[str, Any]) -> None:
        if peer_info.get("transport") != self.transport:
            raise KVTransferError(f"peer info is for transport {peer_info.get('transport')!r}, not 'ray'")
        self._peers[peer_id] = dict(peer_info)

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self._peers

    def abort(self, peer_id: str | None = None) -> None:
        """Nothing to tear down: objects are freed when the tickets naming them are dropped."""

    def send(self, peer_id, meta, layers, timeout_s=None) -> KVSendResult:  # noqa: D102 (see KVSender)
        tid = meta.transfer_id
        deadline = Deadline(self.timeout_s if timeout_s is None else timeout_s, tid)
        refs = []
        num_bytes = 0
        with self.ledger.tracking(tid):
            for layer_idx, layer in validated_layers(meta, layers):
                deadline.remaining(f"storing layer {layer_idx}")
                array = layer_to_numpy(layer)
                refs.append(ray.put(array))
                num_bytes += array.nbytes
        self.ledger.succeeded(tid, num_bytes)
        ticket = KVTicket(self.transport, self.sender_id, peer_id, meta, payload=tuple(refs))
        return KVSendResult(num_bytes, ticket)


class RayKVReceiver(KVReceiver):
    transport = "ray"

    def endpoint_info(self) -> dict[str, Any]:
        return {"transport": self.transport, "receiver_id": self.receiver_id}

    def abort(self, peer_id: str | None = None) -> None:
        """Nothing to tear down (no communicator)."""

    def recv(self, ticket, kv, dst_block_ids, timeout_s=None) -> int:  # noqa: D102 (see KVReceiver)
        tid = ticket.meta.transfer_id
        deadline = Deadline(self.timeout_s if timeout_s is None else timeout_s, tid)
        with self.ledger.tracking(tid):
            meta = self._check_ticket(ticket, kv, dst_block_ids)
            if len(ticket.payload) != meta.num_layers:
                raise KVTransferError(
                    f"ticket names {len(ticket.payload)} layers, meta {meta.num_layers}", transfer_id=tid
                )
            index = block_index(meta.dst_block_ids, kv.device)
            for layer_idx, ref in enumerate(ticket.payload):
                try:
                    array = ray.get(ref, timeout=deadline.remaining(f"fetching layer {layer_idx}"))
                except ray.exceptions.GetTimeoutError as e:
                    raise KVTransferTimeout(f"fetching layer {layer_idx}: {e}", transfer_id=tid) from e
                except ray.exceptions.RayError as e:
                    message = f"fetching layer {layer_idx}: {type(e).__name__}: {e}"
                    raise KVTransferError(message, transfer_id=tid) from e
                scatter_kv_layer(kv, layer_idx, index, layer_from_numpy(array, meta))
                del array
        self.ledger.succeeded(tid, meta.num_bytes)
        return meta.num_bytes
