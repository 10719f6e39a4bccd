"""The fake transport: the ticket carries the layers themselves (handoff style).

For unit tests of the prefill and decode workers without processes or sockets: `send` copies
each layer into the ticket, `recv` scatters them. Also works through a Ray call (the tensors
are serialized with the ticket), but nothing about it is fast.
"""

from __future__ import annotations

from typing import Any

from .base import Deadline, KVReceiver, KVSender, KVSendResult, KVTicket, KVTransferError
from .layout import block_index, scatter_kv_layer, validated_layers


class LocalKVSender(KVSender):
    transport = "local"
    recv_during_send = False

    def __init__(self, sender_id: str, *, timeout_s: float = 30.0):
        super().__init__(sender_id, timeout_s=timeout_s)
        self._peers: set[str] = set()

    def connect(self, peer_id: str, peer_info: dict[str, Any]) -> None:
        if peer_info.get("transport") != self.transport:
            raise KVTransferError(f"peer info is for transport {peer_info.get('transport')!r}, not 'local'")
        self._peers.add(peer_id)

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self._peers

    def abort(self, peer_id: str | None = None) -> None:
        """Nothing to tear down."""

    def send(self, peer_id, meta, layers, timeout_s=None) -> KVSendResult:  # noqa: D102 (see KVSender)
        tid = meta.transfer_id
        deadline = Deadline(self.timeout_s if timeout_s is None else timeout_s, tid)
        copies = []
        with self.ledger.tracking(tid):
            for layer_idx, layer in validated_layers(meta, layers):
                deadline.remaining(f"copying layer {layer_idx}")
                copies.append(layer.detach().to("cpu", copy=True))
        self.ledger.succeeded(tid, meta.num_bytes)
        return KVSendResult(meta.num_bytes, KVTicket(self.transport, self.sender_id, peer_id, meta, tuple(copies)))


class LocalKVReceiver(KVReceiver):
    transport = "local"

    def endpoint_info(self) -> dict[str, Any]:
        return {"transport": self.transport, "receiver_id": self.receiver_id}

    def abort(self, peer_id: str | None = None) -> None:
        """Nothing to tear down."""

    def recv(self, ticket, kv, dst_block_ids, timeout_s=None) -> int:  # noqa: D102 (see KVReceiver)
        tid = ticket.meta.transfer_id
        with self.ledger.tracking(tid):
            meta = self._check_ticket(ticket, kv, dst_block_ids)
            if len(ticket.payload) != meta.num_layers:
                raise KVTransferError(
                    f"ticket carries {len(ticket.payload)} layers, meta {meta.num_layers}", transfer_id=tid
                )
            index = block_index(meta.dst_block_ids, kv.device)
            for layer_idx, layer in enumerate(ticket.payload):
                scatter_kv_layer(kv, layer_idx, index, layer)
        self.ledger.succeeded(tid, meta.num_bytes)
        return meta.num_bytes
