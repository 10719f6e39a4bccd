"""The ``auto`` KV transport: shared memory to a decode worker on this host, gloo to any other.

A receiver serves both: it hosts an ``shm`` and a ``gloo`` receiver and publishes both pair
infos (plus its host identity) in one dict. A sender picks per pair when it connects: ``shm``
when the receiver's host identity (hostname + kernel boot id) is this host's, else ``gloo``. The
ticket names the transport actually used, so the receiver hands each ``recv`` to the right one.
Every transfer is an ordinary shm or gloo transfer, with that transport's protocol and checks.

This is the default (``kv_transfer.transport: auto``): one-host deployments get the fast
same-host path and multi-node ones stay correct, with no setting to get wrong. Pin ``gloo`` or
``shm`` to force one; GPU clusters use ``nccl``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch

from .base import (KVReceiver, KVSender, KVSendResult, KVTicket, KVTransferError, KVTransferMeta, KVTransferState,
                   KVTransferStats)
from .gloo import GlooKVReceiver, GlooKVSender
from .shm import ShmKVReceiver, ShmKVSender, host_identity


class _BothTransports:
    """What an auto endpoint answers for its shm and gloo endpoints together (``self.shm``,
    ``self.gloo``): pairs, counters and teardown span both."""

    shm: KVSender | KVReceiver
    gloo: KVSender | KVReceiver

    def abort(self, peer_id: str | None = None) -> None:
        self.shm.abort(peer_id)
        self.gloo.abort(peer_id)

    def forget(self, peer_id: str) -> None:
        self.shm.forget(peer_id)
        self.gloo.forget(peer_id)

    def num_pairs(self) -> int:
        return self.shm.num_pairs() + self.gloo.num_pairs()

    def stats(self) -> KVTransferStats:
        a, b = self.shm.stats().to_dict(), self.gloo.stats().to_dict()
        return KVTransferStats(**{k: a[k] + b[k] for k in a})

    def transfer_state(self, transfer_id: str) -> KVTransferState | None:
        return self.shm.transfer_state(transfer_id) or self.gloo.transfer_state(transfer_id)

    def close(self) -> None:
        self.shm.close()
        self.gloo.close()


class AutoKVReceiver(_BothTransports, KVReceiver):
    transport = "auto"

    def __init__(self, receiver_id: str, *, host: str = "127.0.0.1", timeout_s: float = 30.0):
        super().__init__(receiver_id, timeout_s=timeout_s)
        self.shm = ShmKVReceiver(receiver_id, host=host, timeout_s=timeout_s)
        self.gloo = GlooKVReceiver(receiver_id, host=host, timeout_s=timeout_s)

    def _info(self, shm: dict[str, Any], gloo: dict[str, Any]) -> dict[str, Any]:
        return {"transport": self.transport, "receiver_id": self.receiver_id, "host_id": host_identity(),
                "shm": shm, "gloo": gloo}

    def endpoint_info(self) -> dict[str, Any]:
        return self._info(self.shm.endpoint_info(), self.gloo.endpoint_info())

    def prepare_pair(self, peer_id: str) -> dict[str, Any]:
        return self._info(self.shm.prepare_pair(peer_id), self.gloo.prepare_pair(peer_id))

    def _inner(self, ticket: KVTicket) -> KVReceiver:
        if ticket.transport == "shm":
            return self.shm
        if ticket.transport == "gloo":
            return self.gloo
        raise KVTransferError(f"ticket is for transport {ticket.transport!r}; an auto receiver takes shm or gloo",
                              transfer_id=ticket.meta.transfer_id)

    def recv(self, ticket: KVTicket, kv: torch.Tensor, dst_block_ids: Iterable[int],
             timeout_s: float | None = None) -> int:
        return self._inner(ticket).recv(ticket, kv, dst_block_ids, timeout_s)


class AutoKVSender(_BothTransports, KVSender):
    transport = "auto"
    recv_during_send = True  # both shm and gloo are rendezvous transports

    def __init__(self, sender_id: str, *, host: str = "127.0.0.1", timeout_s: float = 30.0, max_lanes: int = 4):
        super().__init__(sender_id, timeout_s=timeout_s)
        self.shm = ShmKVSender(sender_id, timeout_s=timeout_s, max_lanes=max_lanes)
        self.gloo = GlooKVSender(sender_id, host=host, timeout_s=timeout_s, max_lanes=max_lanes)  # binds to `host`
        self._chosen: dict[str, KVSender] = {}  # receiver id -> the transport its pair uses
        self._lock = threading.Lock()

    def connect(self, peer_id: str, peer_info: dict[str, Any]) -> None:
        if peer_info.get("transport") != self.transport:
            raise KVTransferError(f"peer info is for transport {peer_info.get('transport')!r}, not 'auto'")
        same_host = peer_info.get("host_id") == host_identity()
        inner, other = (self.shm, self.gloo) if same_host else (self.gloo, self.shm)
        inner.connect(peer_id, peer_info[inner.transport])
        with self._lock:
            previous = self._chosen.get(peer_id)
            self._chosen[peer_id] = inner
        if previous is other:  # the receiver moved (a new incarnation elsewhere): drop the old pair
            other.forget(peer_id)

    def _inner(self, peer_id: str, transfer_id: str | None = None) -> KVSender:
        with self._lock:
            inner = self._chosen.get(peer_id)
        if inner is None:
            raise KVTransferError(f"not connected to receiver {peer_id!r}: call connect() first",
                                  transfer_id=transfer_id)
        return inner

    def is_connected(self, peer_id: str) -> bool:
        with self._lock:
            return peer_id in self._chosen

    def make_ticket(self, peer_id: str, meta: KVTransferMeta) -> KVTicket:
        return self._inner(peer_id, meta.transfer_id).make_ticket(peer_id, meta)

    def send(self, peer_id: str, meta: KVTransferMeta, layers: Iterable[torch.Tensor],
             timeout_s: float | None = None) -> KVSendResult:
        return self._inner(peer_id, meta.transfer_id).send(peer_id, meta, layers, timeout_s)

    def forget(self, peer_id: str) -> None:
        with self._lock:
            self._chosen.pop(peer_id, None)
        super().forget(peer_id)
