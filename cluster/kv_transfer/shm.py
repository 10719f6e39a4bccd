"""Same-host KV transport: a shared-memory ring per (prefill, decode) pair.

For prefill and decode workers on one host: the single-node CPU case, or KV staged through host
memory on one multi-GPU box. The protocol (announcement, locking, epochs, failure handling) is
in base.py and is run by rendezvous.py, as for gloo; this module supplies the communicator and
the data phase. A pair's communicator, built by its first transfer and reused by the next::

    sender (rank 0)                                       receiver (rank 1)
    ring: memfd, num_slots x slot_bytes, sealed   ====   the same pages, mapped MAP_SHARED
    control: unix socket (SOCK_SEQPACKET)         <--->  48-byte messages (_MSG)

* Setup: before announcing, the sender listens on a fresh abstract unix socket (a random
  128-bit name) and stores the name under the pair's epoch prefix in the receiver's rendezvous
  store (as nccl stores its unique id). The receiver connects; each end checks that the other
  runs as its own uid (SO_PEERCRED). The sender creates the ring with memfd_create, seals its
  size (a peer can never shrink it under the other's mapping) and passes the descriptor over the
  socket (SCM_RIGHTS) with a msgpack hello (sender, epoch, host, ring geometry); the receiver
  checks all of it against its own limits, maps the ring and answers READY.
* Data: the transfer is cut into *pieces* (whole blocks of one layer's K or V) packed in order
  into slot-sized *chunks*; both ends compute that plan from the meta (`chunk_plan`), so nothing
  the sender says decides where bytes land. One credit per chunk is the flow control::

      HEADER  seq = number of chunks, digest = sha256(meta)  --->  == the ticket's meta, else fail
      chunk c written into slot c % num_slots; CHUNK c       --->  scatter its pieces into kv
                                                             <---  CREDIT c (the slot is free;
                                                                   only if a later chunk needs it)
                                                             <---  DONE

  So the receiver scatters chunk c while the sender writes chunk c + 1. The sender gathers
  straight from its cache into the slot when `layers` comes from `iter_kv_layers` on a CPU
  cache (no intermediate layer tensor); other iterables are copied layer by layer. On CPU both
  ends copy runs of consecutive block ids as one slice each (`BlockRuns`).

Why a memfd and not a named /dev/shm file: the ring never has a name, so there is nothing a
crash can leave behind, another process can guess or open, or anyone must remember to unlink;
its pages are freed when both ends have dropped the pair (socket closed, mapping released). It
is also not bounded by the size of the /dev/shm mount (64 MiB in a default Docker container).
The socket doubles as a liveness signal: a peer that dies or aborts closes it, and the other end
fails at once instead of waiting out its deadline.

Same host only: the receiver's pair info carries its host identity (hostname + kernel boot id),
and `connect` refuses a receiver elsewhere, naming gloo / nccl as the transports across nodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import select
import socket
import stat
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack
import numpy as np
import torch

from .base import Deadline, KVTransferError, KVTransferMeta, KVTransferTimeout
from .layout import BlockRuns, KVLayers, block_index, byte_rows, scatter_kv_blocks, validated_layers
from .rendezvous import (
    RendezvousClient,
    RendezvousHost,
    RendezvousKVReceiver,
    RendezvousKVSender,
    epoch_prefix,
    release_frames,
)

RING_NAME = "tessera-kv-ring"  # the memfd's name, as /proc/<pid>/maps and /proc/<pid>/fd show it
# 8 MiB of ring per pair: small enough to stay in the last-level cache between the sender's
# write and the receiver's read, chunks large enough that per-chunk messages cost ~10%. (On the
# 2-core bench machine 1-4 MiB slots x 2-8 were within its run-to-run noise, 0.5 MiB slower.)
DEFAULT_SLOT_BYTES = 2 << 20  # one chunk; also the largest block (of one layer's K or V) it can carry
DEFAULT_NUM_SLOTS = 4
MAX_RING_BYTES = 1 << 30  # the most a receiver maps for one pair (and a sender creates)
_SLOT_ALIGN = 4096  # slots start on page boundaries (and so on every dtype's)
_MAX_SLOTS = 256

_MSG = struct.Struct("<4sIQ32s")  # magic, kind, seq, digest: every control message but the hello
_MAGIC = b"TKVS"
_HEADER, _CHUNK, _CREDIT, _DONE, _READY, _AUTH = 1, 2, 3, 4, 5, 6
_KINDS = {_HEADER: "HEADER", _CHUNK: "CHUNK", _CREDIT: "CREDIT", _DONE: "DONE", _READY: "READY", _AUTH: "AUTH"}
_HELLO_VERSION = 1
_MAX_HELLO_BYTES = 4096
_SOCKET_NAME = re.compile(rb"tessera-kv-[0-9a-f]{32}")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@lru_cache(maxsize=1)
def host_identity() -> str:
    """This host as its kernel knows it: hostname + boot id (differs across nodes, across
    containers with their own hostname, and across a reboot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = "no-boot-id"
    return f"{socket.gethostname()}/{boot_id}"


def meta_digest(meta: KVTransferMeta) -> bytes:
    return hashlib.sha256(meta.to_msgpack()).digest()


def _socket_key(sender_id: str, epoch: int) -> str:
    return f"{epoch_prefix(sender_id, epoch)}/shm_socket"


# -- the plan both ends compute ------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Blocks [start, stop) (positions in the meta's block lists) of one layer's K (half 0) or
    V (half 1), at byte `offset` of a slot; [stop - start, block_size, H, D] in the meta's dtype."""

    layer: int
    half: int
    start: int
    stop: int
    offset: int


def row_bytes(meta: KVTransferMeta) -> int:
    """Bytes of one block of K (or V) of one layer: the unit a piece is made of."""
    return meta.block_size * meta.num_kv_heads * meta.head_dim * meta.torch_dtype.itemsize


def chunk_plan(meta: KVTransferMeta, slot_bytes: int) -> list[tuple[Piece, ...]]:
    """The transfer as chunks (one slot each) of pieces, in layer, K/V, block order. A chunk holds
    one layer at most: a layer goes out as soon as it is written (layer-wise streaming), not
    with the next one."""
    row = row_bytes(meta)
    if row > slot_bytes:
        raise KVTransferError(f"one block of K is {row} bytes, more than a ring slot ({slot_bytes})",
                              transfer_id=meta.transfer_id)
    chunks: list[tuple[Piece, ...]] = []
    pieces: list[Piece] = []
    used = 0
    for layer in range(meta.num_layers):
        for half in (0, 1):
            start = 0
            while start < meta.num_blocks:
                room = (slot_bytes - used) // row
                if room == 0:
                    chunks.append(tuple(pieces))
                    pieces, used = [], 0
                    continue
                stop = min(meta.num_blocks, start + room)
                pieces.append(Piece(layer, half, start, stop, used))
                used += (stop - start) * row
                start = stop
        chunks.append(tuple(pieces))
        pieces, used = [], 0
    return chunks


def piece_view(slot: torch.Tensor, piece: Piece, meta: KVTransferMeta) -> torch.Tensor:
    """The piece's bytes in `slot` (flat uint8) as [n, block_size, H, D] of the meta's dtype."""
    n = piece.stop - piece.start
    raw = slot[piece.offset:piece.offset + n * row_bytes(meta)]
    return raw.view(meta.torch_dtype).view(n, meta.block_size, meta.num_kv_heads, meta.head_dim)


# -- the communicator ------------------------------------------------------------------------------


def _check_peer(sock: socket.socket) -> None:
    """Refuse a peer that runs as another user (anyone on the host can reach an abstract socket)."""
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid != os.geteuid():
        raise KVTransferError(f"shm pair refused: the peer runs as uid {uid}, this worker as {os.geteuid()}")


def _map(fd: int, num_bytes: int) -> torch.Tensor:
    """All of `fd`, MAP_SHARED, as a flat uint8 tensor; unmapped once the last view of it is freed
    (so an abort can never unmap memory a thread is still copying)."""
    return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=num_bytes, dtype=torch.uint8)


def _create_ring(num_bytes: int) -> tuple[int, torch.Tensor]:
    """A sealed memfd of `num_bytes` and its mapping, pages allocated now (not in the first transfer)."""
    fd = os.memfd_create(RING_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, num_bytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        ring = _map(fd, num_bytes)
        ring.zero_()
        return fd, ring
    except BaseException:
        os.close(fd)
        raise


class ShmComm:
    """One pair's control socket and ring mapping.

    `abort` is idempotent and callable from any thread: it shuts the socket down, which wakes our
    own thread blocked on it and tells the peer. The descriptor is closed by whichever of the
    aborting thread and a running data phase (`use`) comes last, so no thread ever uses a closed
    (possibly reused) descriptor.
    """

    def __init__(self, sock: socket.socket, ring: torch.Tensor, num_slots: int, slot_bytes: int):
        self.sock = sock
        self.ring: torch.Tensor | None = ring  # [num_slots * slot_bytes] uint8, shared with the peer
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self._lock = threading.Lock()
        self._alive = True
        self._users = 0
        self._closed = False

    @property
    def alive(self) -> bool:
        """Not aborted, and the peer has not closed its end (so a pair the peer dropped while idle
        is rebuilt by the next transfer instead of failing it)."""
        if self._alive and self._users == 0 and self._peer_closed():
            self.abort()
        return self._alive

    def _peer_closed(self) -> bool:
        """Without blocking, reading or touching the socket's timeout (a data phase may start)."""
        poller = select.poll()
        try:
            poller.register(self.sock.fileno(), select.POLLRDHUP)
        except (OSError, ValueError):  # closed meanwhile
            return True
        return any(revents & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)
                   for _, revents in poller.poll(0))

    def abort(self) -> None:
        with self._lock:
            if not self._alive:
                return
            self._alive = False
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._close_if_unused()

    def _close_if_unused(self) -> None:  # under _lock
        if not self._alive and self._users == 0 and not self._closed:
            self._closed = True
            self.sock.close()
            self.ring = None

    @contextlib.contextmanager
    def use(self, transfer_id: str | None):
        """The data phase of one transfer: the socket stays open (though maybe shut) meanwhile."""
        with self._lock:
            if not self._alive:
                raise KVTransferError("the shm pair was aborted", transfer_id=transfer_id)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                self._close_if_unused()

    def exchange(self, data: bytes, deadline: Deadline) -> bytes:
        """Send 32 bytes in an AUTH message and return the peer's (pair authentication)."""
        with self.use(deadline.transfer_id):
            self.send(_AUTH, deadline, "authenticating the pair", digest=data)
            return self.expect(_AUTH, deadline, "authenticating the pair")[1]

    def slot(self, chunk: int) -> torch.Tensor:
        """The slot chunk `chunk` goes through: flat uint8 [slot_bytes]."""
        assert self.ring is not None
        start = (chunk % self.num_slots) * self.slot_bytes
        return self.ring[start:start + self.slot_bytes]

    def send(self, kind: int, deadline: Deadline, what: str, seq: int = 0, digest: bytes = b"") -> None:
        try:
            self.sock.settimeout(deadline.remaining(what))
            self.sock.send(_MSG.pack(_MAGIC, kind, seq, digest), socket.MSG_NOSIGNAL)
        except TimeoutError as e:
            raise KVTransferTimeout(f"{what} timed out after {deadline.timeout_s:.3g}s",
                                    transfer_id=deadline.transfer_id) from e
        except OSError as e:
            raise KVTransferError(f"{what}: the pair is closed ({e})", transfer_id=deadline.transfer_id) from e

    def expect(self, kind: int, deadline: Deadline, what: str, seq: int | None = None) -> tuple[int, bytes]:
        """Wait for the next message, which must be `kind` (and `seq`); returns (seq, digest)."""
        try:
            self.sock.settimeout(deadline.remaining(what))
            data = self.sock.recv(_MSG.size + 1)
        except TimeoutError as e:
            raise KVTransferTimeout(f"{what} timed out after {deadline.timeout_s:.3g}s",
                                    transfer_id=deadline.transfer_id) from e
        except OSError as e:
            raise KVTransferError(f"{what}: {e}", transfer_id=deadline.transfer_id) from e
        if not data:
            raise KVTransferError(f"{what}: the peer closed the pair", transfer_id=deadline.transfer_id)
        if len(data) != _MSG.size or data[:4] != _MAGIC:
            raise KVTransferError(f"{what}: malformed message from the peer", transfer_id=deadline.transfer_id)
        _, got_kind, got_seq, digest = _MSG.unpack(data)
        if got_kind != kind or (seq is not None and got_seq != seq):
            expected = _KINDS[kind] if seq is None else f"{_KINDS[kind]} {seq}"
            raise KVTransferError(f"{what}: expected {expected}, got {_KINDS.get(got_kind, got_kind)} {got_seq}",
                                  transfer_id=deadline.transfer_id)
        return got_seq, digest


# -- data phase -------------------------------------------------------------------------------------


# A piece of n blocks is copied run by run (slices, one memcpy each) when its block ids form few
# runs of consecutive ids (on average >= this many blocks per run), else with one indexed copy.
_MIN_BLOCKS_PER_RUN = 4


class _PieceSource:
    """Writes the pieces of the layers `send` was given into slots, in plan order.

    From `iter_kv_layers` of a CPU cache of the meta's layout it gathers straight from the cache
    into the slot; any other iterable is consumed layer by layer (and checked, as everywhere)."""

    def __init__(self, meta: KVTransferMeta, layers: Iterable[torch.Tensor]):
        self.meta = meta
        self.row = row_bytes(meta)
        self.direct: KVLayers | None = layers if _can_gather_directly(meta, layers) else None
        self.rows = byte_rows(self.direct.kv) if self.direct is not None else None
        self.runs = BlockRuns(meta.src_block_ids) if self.rows is not None else None
        self._layers = None if self.direct is not None else validated_layers(meta, layers)
        self._layer, self._tensor = -1, None

    def wait_layer(self, layer: int, deadline: Deadline) -> None:
        """Until `layer` may be read: at once, unless prefill is still computing it (a gated
        `iter_kv_layers`; other iterables wait inside their own `next`)."""
        left = deadline.remaining(f"waiting for layer {layer}")
        if self.direct is not None:
            self.direct.wait_layer(layer, left)

    def write(self, piece: Piece, slot: torch.Tensor, slot_np: np.ndarray) -> None:
        n = piece.stop - piece.start
        if self.rows is not None:
            runs = self.runs.within(piece.start, piece.stop)
            if len(runs) * _MIN_BLOCKS_PER_RUN <= n:
                dst = slot_np[piece.offset:piece.offset + n * self.row].reshape(n, self.row)
                src = self.rows[piece.layer, piece.half]  # [num_blocks, row] bytes
                for pos, first, length in runs:
                    dst[pos - piece.start:pos - piece.start + length] = src[first:first + length]
                return
        dst = piece_view(slot, piece, self.meta)
        if self.direct is not None:
            index = self.direct.index[piece.start:piece.stop]
            torch.index_select(self.direct.kv[piece.layer, piece.half], 0, index, out=dst)
            return
        while self._layer < piece.layer:
            self._layer, self._tensor = next(self._layers)
        dst.copy_(self._tensor[piece.half, piece.start:piece.stop])

    def finish(self) -> None:
        """Raise unless exactly num_layers layers were given."""
        if self._layers is not None:
            for _ in self._layers:
                pass
        self._tensor = None


def _can_gather_directly(meta: KVTransferMeta, layers: Iterable[torch.Tensor]) -> bool:
    if not isinstance(layers, KVLayers):
        return False
    kv = layers.kv
    return (kv.device.type == "cpu" and kv.dtype == meta.torch_dtype and kv.dim() == 6
            and (kv.shape[0], kv.shape[1], *kv.shape[3:]) == (meta.num_layers, 2, meta.block_size,
                                                               meta.num_kv_heads, meta.head_dim)
            and layers.block_ids == meta.src_block_ids)


def _send_chunks(comm: ShmComm, meta: KVTransferMeta, layers: Iterable[torch.Tensor], deadline: Deadline) -> int:
    plan = chunk_plan(meta, comm.slot_bytes)
    comm.send(_HEADER, deadline, "sending the header", seq=len(plan), digest=meta_digest(meta))
    source = _PieceSource(meta, layers)
    ring_np = comm.ring.numpy()
    num_credits = 0
    for c, pieces in enumerate(plan):
        while c - num_credits >= comm.num_slots:
            comm.expect(_CREDIT, deadline, "waiting for a free ring slot", seq=num_credits)
            num_credits += 1
        start = (c % comm.num_slots) * comm.slot_bytes
        slot, slot_np = comm.slot(c), ring_np[start:start + comm.slot_bytes]
        for piece in pieces:
            source.wait_layer(piece.layer, deadline)
            source.write(piece, slot, slot_np)
        if c == len(plan) - 1:
            source.finish()  # a wrong layer count fails before the receiver has it all
        comm.send(_CHUNK, deadline, f"sending chunk {c}", seq=c)
    comm.expect(_DONE, deadline, "waiting for the receiver's ack")  # (every credit sent was read above)
    return meta.num_bytes


class _PieceSink:
    """Scatters pieces from ring slots into the receiver's cache (`meta.dst_block_ids`).

    A contiguous CPU cache is written as byte rows with numpy (`byte_rows`): runs of consecutive
    block ids as slices, one memcpy each, scattered ids by fancy indexing, one memcpy per block.
    Any other cache goes through `scatter_kv_blocks`."""

    def __init__(self, meta: KVTransferMeta, kv: torch.Tensor):
        self.meta, self.kv = meta, kv
        self.row = row_bytes(meta)
        self.rows = byte_rows(kv)
        if self.rows is not None:
            self.runs = BlockRuns(meta.dst_block_ids)
        else:
            self.index = block_index(meta.dst_block_ids, kv.device)

    def write(self, piece: Piece, slot: torch.Tensor, slot_np: np.ndarray) -> None:
        if self.rows is None:
            src = piece_view(slot, piece, self.meta)
            scatter_kv_blocks(self.kv, piece.layer, piece.half, self.index[piece.start:piece.stop], src)
            return
        n = piece.stop - piece.start
        src = slot_np[piece.offset:piece.offset + n * self.row].reshape(n, self.row)
        dst = self.rows[piece.layer, piece.half]  # [num_blocks, row] bytes
        runs = self.runs.within(piece.start, piece.stop)
        if len(runs) * _MIN_BLOCKS_PER_RUN <= n:
            for pos, first, length in runs:
                dst[first:first + length] = src[pos - piece.start:pos - piece.start + length]
        else:
            dst[self.runs.ids[piece.start:piece.stop]] = src


def _recv_chunks(comm: ShmComm, meta: KVTransferMeta, kv: torch.Tensor, deadline: Deadline) -> int:
    plan = chunk_plan(meta, comm.slot_bytes)
    num_chunks, digest = comm.expect(_HEADER, deadline, "waiting for the header")
    if digest != meta_digest(meta) or num_chunks != len(plan):
        raise KVTransferError(
            f"header mismatch: the sender is not sending transfer {meta.transfer_id!r} "
            f"(request {meta.request_id!r}) with the ticket's meta", transfer_id=meta.transfer_id)
    sink = _PieceSink(meta, kv)
    ring_np = comm.ring.numpy()
    for c, pieces in enumerate(plan):
        comm.expect(_CHUNK, deadline, f"waiting for chunk {c}", seq=c)
        start = (c % comm.num_slots) * comm.slot_bytes
        slot, slot_np = comm.slot(c), ring_np[start:start + comm.slot_bytes]
        for piece in pieces:
            sink.write(piece, slot, slot_np)
        if c + comm.num_slots < len(plan):  # the sender reuses this slot
            comm.send(_CREDIT, deadline, f"freeing chunk {c}", seq=c)
    comm.send(_DONE, deadline, "sending the ack")
    return meta.num_bytes


# -- endpoints ----------------------------------------------------------------------------------------


class ShmKVSender(RendezvousKVSender):
    transport = "shm"

    def __init__(self, sender_id: str, *, timeout_s: float = 30.0, slot_bytes: int = DEFAULT_SLOT_BYTES,
                 num_slots: int = DEFAULT_NUM_SLOTS, max_lanes: int = 4):
        super().__init__(sender_id, timeout_s=timeout_s, max_lanes=max_lanes)
        if slot_bytes < _SLOT_ALIGN or slot_bytes % _SLOT_ALIGN or not 1 <= num_slots <= _MAX_SLOTS:
            raise ValueError(f"slot_bytes must be a positive multiple of {_SLOT_ALIGN} and num_slots in "
                             f"[1, {_MAX_SLOTS}]; got {slot_bytes} and {num_slots}")
        if slot_bytes * num_slots > MAX_RING_BYTES:
            raise ValueError(f"ring of {slot_bytes * num_slots} bytes exceeds {MAX_RING_BYTES}")
        self.slot_bytes = slot_bytes  # one chunk
        self.num_slots = num_slots  # chunks in flight

    def connect(self, peer_id: str, peer_info: dict[str, Any]) -> None:
        if peer_info.get("transport") == self.transport and peer_info.get("host_id") != host_identity():
            raise KVTransferError(
                f"the shm KV transport needs prefill and decode workers on one host, but receiver {peer_id!r} "
                f"runs on {peer_info.get('host_id')!r} and this sender on {host_identity()!r}: use "
                f"kv_transfer.transport gloo (or nccl on GPUs) across nodes")
        super().connect(peer_id, peer_info)

    def _prepare_comm(self, client: RendezvousClient, wire_id: str, epoch: int) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            name = f"tessera-kv-{secrets.token_hex(16)}"
            listener.bind(f"\0{name}")  # abstract namespace: no file, gone with the socket
            listener.listen(1)
            client.set_bytes(_socket_key(wire_id, epoch), name.encode())
        except BaseException:
            listener.close()
            raise
        return listener

    def _open_comm(self, client: RendezvousClient, wire_id: str, epoch: int, listener: socket.socket,
                   deadline: Deadline) -> ShmComm:
        with listener:
            try:
                listener.settimeout(deadline.remaining("waiting for the receiver to join the shm pair"))
                sock, _ = listener.accept()
            except TimeoutError as e:
                raise KVTransferTimeout(f"the receiver did not join the shm pair within {deadline.timeout_s:.3g}s",
                                        transfer_id=deadline.transfer_id) from e
        try:
            _check_peer(sock)
            comm = self._hand_over_ring(sock, wire_id, epoch, deadline)
        except BaseException:
            sock.close()
            raise
        try:
            comm.expect(_READY, deadline, "waiting for the receiver to map the ring")
        except BaseException:
            comm.abort()
            raise
        return comm

    def _hand_over_ring(self, sock: socket.socket, wire_id: str, epoch: int, deadline: Deadline) -> ShmComm:
        fd, ring = _create_ring(self.num_slots * self.slot_bytes)
        try:
            hello = msgpack.packb({"v": _HELLO_VERSION, "sender_id": wire_id, "epoch": epoch,
                                   "host_id": host_identity(), "num_slots": self.num_slots,
                                   "slot_bytes": self.slot_bytes})
            sock.settimeout(deadline.remaining("sending the ring"))
            socket.send_fds(sock, [hello], [fd])
        finally:
            os.close(fd)  # our mapping and the receiver's copy of the descriptor keep the ring
        return ShmComm(sock, ring, self.num_slots, self.slot_bytes)

    def _exchange(self, comm: ShmComm, data: bytes, deadline: Deadline) -> bytes:
        return comm.exchange(data, deadline)

    def _send_data(self, comm: ShmComm, meta: KVTransferMeta, layers: Iterable[torch.Tensor],
                   deadline: Deadline) -> int:
        try:
            with comm.use(meta.transfer_id):
                return _send_chunks(comm, meta, layers, deadline)
        except BaseException as e:
            comm.abort()
            release_frames(e)  # their frames hold views of the ring
            raise


class ShmKVReceiver(RendezvousKVReceiver):
    transport = "shm"

    def __init__(self, receiver_id: str, *, host: str = "127.0.0.1", timeout_s: float = 30.0,
                 max_ring_bytes: int = MAX_RING_BYTES):
        super().__init__(receiver_id, host=host, timeout_s=timeout_s)
        self.max_ring_bytes = max_ring_bytes  # the largest ring a sender may hand this receiver

    def endpoint_info(self) -> dict[str, Any]:
        return {**super().endpoint_info(), "host_id": host_identity()}

    def _open_comm(self, rendezvous: RendezvousHost, sender_id: str, epoch: int, deadline: Deadline) -> ShmComm:
        tid = deadline.transfer_id
        name = rendezvous.pop_bytes(_socket_key(sender_id, epoch))
        if not _SOCKET_NAME.fullmatch(name):
            raise KVTransferError("malformed shm socket name in the rendezvous store", transfer_id=tid)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(deadline.remaining("joining the shm pair"))
            try:
                sock.connect(b"\0" + name)
            except OSError as e:
                raise KVTransferError(f"cannot reach the sender's shm socket ({e}): are both workers on one host, "
                                      f"in one network namespace?", transfer_id=tid) from e
            _check_peer(sock)
            comm = ShmComm(sock, *self._receive_ring(sock, sender_id, epoch, deadline))
        except BaseException:
            sock.close()
            raise
        try:
            comm.send(_READY, deadline, "confirming the ring")
        except BaseException:
            comm.abort()
            raise
        return comm

    def _receive_ring(self, sock: socket.socket, sender_id: str, epoch: int,
                      deadline: Deadline) -> tuple[torch.Tensor, int, int]:
        """The hello and the ring's descriptor; everything checked before the ring is mapped."""
        tid = deadline.transfer_id
        sock.settimeout(deadline.remaining("waiting for the sender's ring"))
        try:
            data, fds, flags, _ = socket.recv_fds(sock, _MAX_HELLO_BYTES, 1)
        except TimeoutError as e:
            raise KVTransferTimeout(f"no ring from the sender within {deadline.timeout_s:.3g}s", transfer_id=tid) from e
        try:
            if not data:
                raise KVTransferError("the sender closed the shm pair during setup", transfer_id=tid)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 1:
                raise KVTransferError("malformed shm hello (size or descriptors)", transfer_id=tid)
            try:
                hello = msgpack.unpackb(data, raw=False)
                num_slots, slot_bytes = int(hello["num_slots"]), int(hello["slot_bytes"])
                fields = (hello["v"], hello["sender_id"], hello["epoch"], hello["host_id"])
            except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
                raise KVTransferError(f"malformed shm hello: {e}", transfer_id=tid) from e
            if fields != (_HELLO_VERSION, sender_id, epoch, host_identity()):
                raise KVTransferError(f"shm hello {fields} does not match this pair "
                                      f"{(_HELLO_VERSION, sender_id, epoch, host_identity())}", transfer_id=tid)
            num_bytes = num_slots * slot_bytes
            if (not 1 <= num_slots <= _MAX_SLOTS or slot_bytes < _SLOT_ALIGN or slot_bytes % _SLOT_ALIGN
                    or num_bytes > self.max_ring_bytes):
                raise KVTransferError(f"shm ring of {num_slots} x {slot_bytes} bytes refused (at most "
                                      f"{self.max_ring_bytes} bytes, slots multiples of {_SLOT_ALIGN})",
                                      transfer_id=tid)
            st = os.fstat(fds[0])
            try:
                seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
            except OSError:  # not a memfd (nor any file that can be sealed)
                seals = 0
            if not stat.S_ISREG(st.st_mode) or st.st_size != num_bytes or seals & _SEALS != _SEALS:
                raise KVTransferError(f"shm ring descriptor refused (size {st.st_size}, expected {num_bytes}; "
                                      f"seals {seals:#x})", transfer_id=tid)
            ring = _map(fds[0], num_bytes)
        finally:
            for fd in fds:
                os.close(fd)
        ring[::_SLOT_ALIGN].sum()  # map every page now, not in the first transfer
        return ring, num_slots, slot_bytes

    def _exchange(self, comm: ShmComm, data: bytes, deadline: Deadline) -> bytes:
        return comm.exchange(data, deadline)

    def _recv_data(self, comm: ShmComm, meta: KVTransferMeta, kv: torch.Tensor, deadline: Deadline) -> int:
        try:
            with comm.use(meta.transfer_id):
                return _recv_chunks(comm, meta, kv, deadline)
        except BaseException as e:
            comm.abort()
            release_frames(e)  # their frames hold views of the ring
            raise
