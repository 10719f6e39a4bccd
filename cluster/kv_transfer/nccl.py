"""GPU KV transport: one 2-rank NCCL communicator per (prefill, decode) pair.

The protocol (announcement, locking, epochs, failure handling) is in base.py and is run by
rendezvous.py; this module supplies the communicator and the data phase:

* Pair setup: the sender (rank 0) calls ncclGetUniqueId and stores the 128 bytes under the
  pair's epoch prefix in the receiver's rendezvous store *before* announcing the transfer; the
  receiver reads them and both call ncclCommInitRankConfig (nonblocking), polled under the
  deadline. A unique id is single-use, so a re-created pair gets a fresh one: no Ray call needed.
* Data: on a dedicated CUDA stream per pair (it waits for the caller's current stream before
  each layer, so layers still being computed are sent once ready)::

      rank 0 (sender)                                   rank 1 (receiver)
      header uint8[64] (magic, len, sha256(meta)) --->  == header of ticket.meta, else fail
      layer l: [2, n, bs, H, D] in kv dtype      --->  staging[l % 2] -> index_copy_ into kv
      ack int32[1] = 1                            <---

  The receiver enqueues every layer's recv + scatter at once, all on its stream (so staging
  buffer l % 2 is reused only after layer l-2 was scattered), then waits on one event.
* Timeouts: the host polls a CUDA event and ncclCommGetAsyncError until done, an NCCL error,
  or the deadline; then ncclCommAbort, which also stops kernels still waiting for the peer.

NCCL does not allow two ranks of one communicator on the same GPU: sender and receiver must
be on different devices (in production, different nodes or GPUs anyway).

Importing this module needs neither CUDA nor NCCL; constructing an endpoint checks both and
raises KVTransferError saying what is missing.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch

from .base import Deadline, KVTransferError, KVTransferMeta
from .layout import validated_layers
from .nccl_lib import (
    NCCL_IN_PROGRESS,
    NCCL_SUCCESS,
    NcclError,
    NcclLibrary,
    NcclUnavailable,
    load_nccl,
)
from .rendezvous import (
    RendezvousClient,
    RendezvousHost,
    RendezvousKVReceiver,
    RendezvousKVSender,
    epoch_prefix,
)

_HEADER_BYTES = 64
_HEADER_MAGIC = b"TSRAKV01"
_ACK_OK = 1
_POLL_S = 0.0002  # host polling period while a transfer is on the GPU
_ABORT_GRACE_S = 2.0  # after abort, how long to wait for the stream before giving up on it


def nccl_header(meta: KVTransferMeta) -> bytes:
    """Fixed-size header: NCCL needs equal counts on both ends, so the meta travels as a digest
    (the receiver already holds the meta from its ticket and compares)."""
    packed = meta.to_msgpack()
    header = _HEADER_MAGIC + struct.pack("<Q", len(packed)) + hashlib.sha256(packed).digest()
    return header.ljust(_HEADER_BYTES, b"\0")


def _uid_key(sender_id: str, epoch: int) -> str:
    return f"{epoch_prefix(sender_id, epoch)}/nccl_unique_id"


def _resolve_device(device: int | str | torch.device | None) -> torch.device:
    if not torch.cuda.is_available():
        raise KVTransferError("the nccl KV transport needs CUDA, and torch.cuda.is_available() is False")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda":
        raise KVTransferError(f"the nccl KV transport needs a CUDA device, got {device}")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def _load(library_path: str | None) -> NcclLibrary:
    try:
        lib = load_nccl(library_path)
    except NcclUnavailable as e:
        raise KVTransferError(f"the nccl KV transport is unavailable: {e}") from e
    if not lib.has_config:  # a blocking init could not be bounded by the deadline
        raise KVTransferError(f"the nccl KV transport needs NCCL >= 2.14 (nonblocking init), found {lib.version}")
    return lib


class NcclComm:
    """A pair's NCCL communicator and CUDA stream; `abort` is idempotent and thread-safe."""

    def __init__(self, lib: NcclLibrary, handle: int, device: torch.device):
        self.lib = lib
        self.handle = handle
        self.device = device
        self.stream = torch.cuda.Stream(device)
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
        with torch.cuda.device(self.device):
            self.lib.comm_abort(self.handle)

    def wait_ready(self, deadline: Deadline, what: str) -> None:
        """Poll until the nonblocking comm finished the last call (init or enqueue)."""
        while True:
            state = self.lib.comm_get_async_error(self.handle)
            if state == NCCL_SUCCESS:
                return
            if state != NCCL_IN_PROGRESS:
                raise NcclError(state, what, self.lib.error_string(state))
            deadline.remaining(what)
            time.sleep(_POLL_S)

    def wait_event(self, event: torch.cuda.Event, deadline: Deadline, what: str) -> None:
        """Poll `event` and the comm's async error until the event completes."""
        while not event.query():
            state = self.lib.comm_get_async_error(self.handle)
            if state not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
                raise NcclError(state, what, self.lib.error_string(state))
            deadline.remaining(what)
            time.sleep(_POLL_S)

    def call(self, code: int, deadline: Deadline, what: str) -> None:
        if code == NCCL_IN_PROGRESS:
            self.wait_ready(deadline, what)

    def send(self, t: torch.Tensor, peer: int, deadline: Deadline, what: str) -> None:
        code = self.lib.send(self.handle, t.data_ptr(), t.numel(), t.dtype, peer, self.stream.cuda_stream)
        self.call(code, deadline, what)

    def recv(self, t: torch.Tensor, peer: int, deadline: Deadline, what: str) -> None:
        code = self.lib.recv(self.handle, t.data_ptr(), t.numel(), t.dtype, peer, self.stream.cuda_stream)
        self.call(code, deadline, what)

    def drained(self, grace_s: float) -> bool:
        """After an abort: whether the stream finished its queued work within `grace_s`."""
        event = torch.cuda.Event()
        event.record(self.stream)
        t_end = time.monotonic() + grace_s
        while not event.query():
            if time.monotonic() > t_end:
                return False
            time.sleep(1e-3)
        return True


def _open(lib: NcclLibrary, device: torch.device, unique_id: bytes, rank: int, deadline: Deadline) -> NcclComm:
    with torch.cuda.device(device):
        handle, _ = lib.comm_init_rank(2, unique_id, rank, blocking=False)
        comm = NcclComm(lib, handle, device)
        try:
            comm.wait_ready(deadline, "building the NCCL pair")
        except BaseException:
            comm.abort()
            raise
        return comm


def _guarded(comm: NcclComm, buffers: list[Any], leaked: list[Any], fn, *args) -> int:
    """Run a data phase; on failure abort the comm first (stops kernels waiting for the peer),
    then make sure the buffers its stream may still use are not freed under it: if the stream
    does not drain within the grace period they are parked in `leaked` for good."""
    try:
        with torch.cuda.device(comm.device):
            return fn(*args)
    except BaseException as e:
        comm.abort()
        if not comm.drained(_ABORT_GRACE_S):
            leaked.extend(buffers)
        if isinstance(e, NcclError):
            raise KVTransferError(str(e)) from e
        raise


def _exchange(comm: NcclComm, peer: int, data: bytes, deadline: Deadline, send_first: bool) -> bytes:
    """Send ``data`` to ``peer`` and receive as many bytes from it on the pair's stream (pair
    authentication); the sender sends first, the receiver receives first (NCCL point-to-point
    calls on one stream complete in order, so both sending first would deadlock)."""
    with torch.cuda.device(comm.device):
        out = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(comm.device)
        got = torch.zeros(len(data), dtype=torch.uint8, device=comm.device)
        comm.stream.wait_stream(torch.cuda.current_stream(comm.device))
        what = "authenticating the pair"
        for op in ((comm.send, out), (comm.recv, got)) if send_first else ((comm.recv, got), (comm.send, out)):
            op[0](op[1], peer, deadline, what)
        done = torch.cuda.Event()
        done.record(comm.stream)
        comm.wait_event(done, deadline, what)
        return got.cpu().numpy().tobytes()


class NcclKVSender(RendezvousKVSender):
    transport = "nccl"

    def __init__(
        self,
        sender_id: str,
        *,
        device: int | str | torch.device | None = None,
        timeout_s: float = 30.0,
        library_path: str | None = None,
        max_lanes: int = 4,
    ):
        super().__init__(sender_id, timeout_s=timeout_s, max_lanes=max_lanes)
        self.device = _resolve_device(device)
        self._lib = _load(library_path)
        self._leaked: list[Any] = []  # buffers of aborted transfers whose stream never drained

    def _prepare_comm(self, client: RendezvousClient, wire_id: str, epoch: int) -> bytes:
        unique_id = self._lib.get_unique_id()
        client.set_bytes(_uid_key(wire_id, epoch), unique_id)
        return unique_id

    def _open_comm(self, client: RendezvousClient, wire_id: str, epoch: int, setup: bytes,
                   deadline: Deadline) -> NcclComm:
        return _open(self._lib, self.device, setup, 0, deadline)

    def _exchange(self, comm: NcclComm, data: bytes, deadline: Deadline) -> bytes:
        return _exchange(comm, 1, data, deadline, send_first=True)

    def _send_data(
        self, comm: NcclComm, meta: KVTransferMeta, layers: Iterable[torch.Tensor], deadline: Deadline
    ) -> int:
        buffers: list[Any] = []
        return _guarded(comm, buffers, self._leaked, self._send_on_stream, comm, meta, layers, deadline, buffers)

    def _send_on_stream(self, comm, meta, layers, deadline, buffers) -> int:
        stream = comm.stream
        with torch.cuda.stream(stream):
            header = torch.frombuffer(bytearray(nccl_header(meta)), dtype=torch.uint8).to(self.device)
            ack = torch.zeros(1, dtype=torch.int32, device=self.device)
        buffers += [header, ack]
        comm.send(header, 1, deadline, "sending the header")
        num_bytes = 0
        for layer_idx, layer in validated_layers(meta, layers):
            # On the producer's stream: make it a contiguous tensor on our device ...
            t = layer.detach().to(self.device).contiguous()
            # ... then order our stream after the producer's work and keep t alive for it.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            t.record_stream(stream)
            buffers.append(t)
            comm.send(t, 1, deadline, f"sending layer {layer_idx}")
            num_bytes += t.numel() * t.element_size()
            deadline.remaining(f"sending layer {layer_idx}")
        comm.recv(ack, 1, deadline, "waiting for the receiver's ack")
        done = torch.cuda.Event()
        done.record(stream)
        comm.wait_event(done, deadline, "waiting for the receiver's ack")
        if int(ack.item()) != _ACK_OK:
            raise KVTransferError(f"receiver answered {int(ack.item())}", transfer_id=meta.transfer_id)
        return num_bytes


class NcclKVReceiver(RendezvousKVReceiver):
    transport = "nccl"

    def __init__(
        self,
        receiver_id: str,
        *,
        device: int | str | torch.device | None = None,
        host: str = "127.0.0.1",
        timeout_s: float = 30.0,
        library_path: str | None = None,
    ):
        self.device = _resolve_device(device)
        self._lib = _load(library_path)
        self._leaked: list[Any] = []  # buffers of aborted transfers whose stream never drained
        super().__init__(receiver_id, host=host, timeout_s=timeout_s)

    def _open_comm(self, rendezvous: RendezvousHost, sender_id: str, epoch: int, deadline: Deadline) -> NcclComm:
        unique_id = rendezvous.pop_bytes(_uid_key(sender_id, epoch))
        return _open(self._lib, self.device, unique_id, 1, deadline)

    def _exchange(self, comm: NcclComm, data: bytes, deadline: Deadline) -> bytes:
        return _exchange(comm, 0, data, deadline, send_first=False)

    def _recv_data(self, comm: NcclComm, meta: KVTransferMeta, kv: torch.Tensor, deadline: Deadline) -> int:
        if kv.device != self.device:
            raise KVTransferError(f"cache is on {kv.device}, receiver on {self.device}", transfer_id=meta.transfer_id)
        buffers: list[Any] = []
        return _guarded(comm, buffers, self._leaked, self._recv_on_stream, comm, meta, kv, deadline, buffers)

    def _recv_on_stream(self, comm, meta, kv, deadline, buffers) -> int:
        stream = comm.stream
        with torch.cuda.stream(stream):
            header = torch.empty(_HEADER_BYTES, dtype=torch.uint8, device=self.device)
        buffers.append(header)
        comm.recv(header, 0, deadline, "receiving the header")
        got_header = torch.cuda.Event()
        got_header.record(stream)
        comm.wait_event(got_header, deadline, "receiving the header")
        if bytes(header.cpu().numpy()) != nccl_header(meta):
            raise KVTransferError(
                "header mismatch: the sender is sending a different transfer or meta", transfer_id=meta.transfer_id
            )

        # Our stream must not scatter into kv before the caller's queued work on it is done.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            index = torch.as_tensor(meta.dst_block_ids, dtype=torch.int64).to(self.device)
            staging = [torch.empty(meta.layer_shape, dtype=kv.dtype, device=self.device) for _ in range(2)]
            ack = torch.tensor([_ACK_OK], dtype=torch.int32).to(self.device)
        buffers += [index, ack, *staging]
        for layer_idx in range(meta.num_layers):
            buf = staging[layer_idx % 2]  # free again: the previous scatter from it is queued before
            comm.recv(buf, 0, deadline, f"receiving layer {layer_idx}")
            with torch.cuda.stream(stream):
                kv[layer_idx].index_copy_(1, index, buf)
        comm.send(ack, 0, deadline, "sending the ack")
        done = torch.cuda.Event()
        done.record(stream)
        comm.wait_event(done, deadline, "receiving the layers")
        return meta.num_bytes

