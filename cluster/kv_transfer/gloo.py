"""CPU KV transport: one 2-rank ProcessGroupGloo per (prefill, decode) pair.

The protocol (announcement, locking, epochs, failure handling) is in base.py and is run by
rendezvous.py; this module supplies the communicator and the data phase. On the wire, by tag::

    rank 0 (sender)                                        rank 1 (receiver)
    TAG_HEADER_LEN  int64[1] = len(msgpack(meta))   ---->
    TAG_HEADER      uint8[len] = msgpack(meta)      ---->  == ticket.meta, else fail
    TAG_LAYER0 + l  uint8[layer bytes], l = 0..L-1  ---->  staging[l % 2] -> scatter
                    int64[1] = ACK_OK               <----  TAG_ACK

Each group is built on the receiver's store under the pair's epoch prefix (never the default
process group) and binds its sockets to `host`. Every wait has the transfer's deadline.
CUDA caches work too (layers are staged through host memory); use nccl for GPU-to-GPU.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from datetime import timedelta

import torch
from torch.distributed import ProcessGroupGloo

from .base import Deadline, KVTransferError, KVTransferMeta, KVTransferTimeout
from .layout import as_bytes, block_index, scatter_kv_layer, validated_layers
from .rendezvous import (
    RendezvousClient,
    RendezvousHost,
    RendezvousKVReceiver,
    RendezvousKVSender,
    release_frames,
)

_TAG_HEADER_LEN = 0
_TAG_HEADER = 1
_TAG_ACK = 2
_TAG_AUTH = 3
_TAG_LAYER0 = 16
_ACK_OK = 1
_MAX_HEADER_BYTES = 64 << 20  # sanity bound on a peer-sent length (meta of ~4M blocks)
_MAX_SENDS_IN_FLIGHT = 2  # layers posted but not yet written out (bounds extra host memory)


class GlooComm:
    """A pair's ProcessGroupGloo; `abort` is idempotent and thread-safe.

    NOTE: gloo closes the pair's sockets only when the group object is freed (abort() and
    shutdown() leave them open), and the peer notices our failure only then. So `abort` drops
    our reference and the data phase strips the tracebacks of its errors, whose frames would
    otherwise keep the group (or its pending works) alive until the caller drops the error.
    """

    def __init__(self, group: ProcessGroupGloo):
        self.group: ProcessGroupGloo | None = group
        self._alive = True
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._alive

    def abort(self) -> None:
        with self._lock:
            if not self._alive:
                return
            self._alive = False
            group, self.group = self.group, None
        try:
            group.abort()
        except RuntimeError:
            pass


def _new_group(store, rank: int, host: str, deadline: Deadline) -> GlooComm:
    opts = ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=deadline.remaining("building the gloo pair"))
    opts._devices = [ProcessGroupGloo.create_device(hostname=host)]
    try:
        return GlooComm(ProcessGroupGloo(store, rank, 2, opts))
    except RuntimeError as e:  # DistStoreError when the peer never joins
        cls = KVTransferTimeout if "timeout" in str(e).lower() else KVTransferError
        raise cls(f"gloo pair setup failed: {e}", transfer_id=deadline.transfer_id) from e


def _wait(work, deadline: Deadline, what: str) -> None:
    try:
        work.wait(timedelta(seconds=deadline.remaining(what)))
    except RuntimeError as e:
        cls = KVTransferTimeout if "timed out" in str(e).lower() else KVTransferError
        raise cls(f"{what}: {e}", transfer_id=deadline.transfer_id) from e


def _exchange(comm: GlooComm, peer: int, data: bytes, deadline: Deadline) -> bytes:
    """Send ``data`` to ``peer`` and receive as many bytes from it (pair authentication)."""
    out = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    got = torch.zeros(len(data), dtype=torch.uint8)
    sent = comm.group.send([out], peer, _TAG_AUTH)
    _wait(comm.group.recv([got], peer, _TAG_AUTH), deadline, "authenticating the pair")
    _wait(sent, deadline, "authenticating the pair")
    return got.numpy().tobytes()


def _send_layers(
    group: ProcessGroupGloo, meta: KVTransferMeta, layers: Iterable[torch.Tensor], deadline: Deadline
) -> int:
    header = meta.to_msgpack()
    header_len = torch.tensor([len(header)], dtype=torch.int64)
    header_t = torch.frombuffer(bytearray(header), dtype=torch.uint8)
    in_flight: deque[tuple[object, torch.Tensor, str]] = deque()
    in_flight.append((group.send([header_len], 1, _TAG_HEADER_LEN), header_len, "sending the header"))
    in_flight.append((group.send([header_t], 1, _TAG_HEADER), header_t, "sending the header"))
    num_bytes = 0
    for layer_idx, layer in validated_layers(meta, layers):
        buf = as_bytes(layer.detach().cpu())
        in_flight.append((group.send([buf], 1, _TAG_LAYER0 + layer_idx), buf, f"sending layer {layer_idx}"))
        num_bytes += buf.numel()
        while len(in_flight) > _MAX_SENDS_IN_FLIGHT:
            work, _, what = in_flight.popleft()
            _wait(work, deadline, what)
    while in_flight:
        work, _, what = in_flight.popleft()
        _wait(work, deadline, what)
    ack = torch.zeros(1, dtype=torch.int64)
    _wait(group.recv([ack], 1, _TAG_ACK), deadline, "waiting for the receiver's ack")
    if int(ack.item()) != _ACK_OK:
        raise KVTransferError(f"receiver answered {int(ack.item())}", transfer_id=meta.transfer_id)
    return num_bytes


def _recv_layers(group: ProcessGroupGloo, meta: KVTransferMeta, kv: torch.Tensor, deadline: Deadline) -> int:
    header_len = torch.zeros(1, dtype=torch.int64)
    _wait(group.recv([header_len], 0, _TAG_HEADER_LEN), deadline, "receiving the header")
    n = int(header_len.item())
    if not 0 < n <= _MAX_HEADER_BYTES:
        raise KVTransferError(f"bad header length {n}", transfer_id=meta.transfer_id)
    header = torch.empty(n, dtype=torch.uint8)
    _wait(group.recv([header], 0, _TAG_HEADER), deadline, "receiving the header")
    got = KVTransferMeta.from_msgpack(header.numpy().tobytes())
    if got != meta:
        raise KVTransferError(
            f"header mismatch: expected transfer {meta.transfer_id!r} (request {meta.request_id!r}), "
            f"sender sent {got.transfer_id!r} (request {got.request_id!r})"
            + ("" if got.transfer_id != meta.transfer_id else " with a different meta"),
            transfer_id=meta.transfer_id,
        )

    # Double-buffered: layer l+2 is posted into the buffer layer l was scattered from.
    index = block_index(meta.dst_block_ids, kv.device)
    staging = [torch.empty(meta.layer_shape, dtype=meta.torch_dtype) for _ in range(min(2, meta.num_layers))]
    works = {}

    def post(layer_idx: int) -> None:
        buf = as_bytes(staging[layer_idx % 2])
        works[layer_idx] = group.recv([buf], 0, _TAG_LAYER0 + layer_idx)

    for layer_idx in range(len(staging)):
        post(layer_idx)
    for layer_idx in range(meta.num_layers):
        _wait(works.pop(layer_idx), deadline, f"receiving layer {layer_idx}")
        scatter_kv_layer(kv, layer_idx, index, staging[layer_idx % 2])
        if layer_idx + 2 < meta.num_layers:
            post(layer_idx + 2)
    ack = torch.tensor([_ACK_OK], dtype=torch.int64)
    _wait(group.send([ack], 0, _TAG_ACK), deadline, "sending the ack")
    return meta.num_bytes


class GlooKVSender(RendezvousKVSender):
    transport = "gloo"

    def __init__(self, sender_id: str, *, host: str = "127.0.0.1", timeout_s: float = 30.0, max_lanes: int = 4):
        super().__init__(sender_id, timeout_s=timeout_s, max_lanes=max_lanes)
        self.host = host  # local interface gloo binds to; the receiver must reach it

    def _open_comm(self, client: RendezvousClient, wire_id: str, epoch: int, setup, deadline: Deadline) -> GlooComm:
        return _new_group(client.pair_store(wire_id, epoch), 0, self.host, deadline)

    def _exchange(self, comm: GlooComm, data: bytes, deadline: Deadline) -> bytes:
        return _exchange(comm, 1, data, deadline)

    def _send_data(
        self, comm: GlooComm, meta: KVTransferMeta, layers: Iterable[torch.Tensor], deadline: Deadline
    ) -> int:
        try:
            return _send_layers(comm.group, meta, layers, deadline)
        except BaseException as e:
            comm.abort()
            release_frames(e)
            raise


class GlooKVReceiver(RendezvousKVReceiver):
    transport = "gloo"

    def _open_comm(self, rendezvous: RendezvousHost, sender_id: str, epoch: int, deadline: Deadline) -> GlooComm:
        return _new_group(rendezvous.pair_store(sender_id, epoch), 1, self.host, deadline)

    def _exchange(self, comm: GlooComm, data: bytes, deadline: Deadline) -> bytes:
        return _exchange(comm, 0, data, deadline)

    def _recv_data(self, comm: GlooComm, meta: KVTransferMeta, kv: torch.Tensor, deadline: Deadline) -> int:
        try:
            return _recv_layers(comm.group, meta, kv, deadline)
        except BaseException as e:
            comm.abort()
            release_frames(e)
            raise
