"""The rendezvous store of rendezvous transports (gloo, nccl); see base.py for the protocol.

The receiver hosts one TCPStore for all its senders (`RendezvousHost`); each sender opens one
client per receiver (`RendezvousClient`). Keys of a pair live under ``kv/<sender_id>/``. Values
are msgpack or raw bytes: nothing on this socket is pickled.

NOTE: a TCPStore client serializes its operations on one socket, so a blocking `wait` would
hold up every other thread using that client. Blocking waits therefore get their own
connection: each receiver thread has a thread-local clone, and a communicator build uses a
fresh clone on the sender.
"""

from __future__ import annotations

import secrets
import socket
import threading
import traceback
import uuid
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import msgpack
from torch.distributed import PrefixStore, Store, TCPStore


from .pair_auth import PAIR_KEY_BYTES, KVPeerRefused, authenticate, pair_key  # noqa: F401 (re-exported)
from .base import (
    Deadline,
    KVReceiver,
    KVSender,
    KVSendResult,
    KVTransferError,
    KVTransferMeta,
    KVTransferState,
    KVTransferTimeout,
)

_STORE_OP_TIMEOUT_S = 30.0
def pair_prefix(sender_id: str) -> str:
    return f"kv/{sender_id}"


def epoch_prefix(sender_id: str, epoch: int) -> str:
    """Store prefix of one communicator generation of the pair."""
    return f"kv/{sender_id}/{epoch}"


def _announce_key(sender_id: str, transfer_id: str) -> str:
    return f"kv/{sender_id}/xfer/{transfer_id}"


MAX_LANES = 16


def lane_id(sender_id: str, lane: int) -> str:
    """The id lane ``lane`` of a sender's pair with one receiver goes by on the wire: its store
    keys, its communicator's rendezvous, its authentication (lane 0 is the sender itself)."""
    return sender_id if lane == 0 else f"{sender_id}#{lane}"


@dataclass(frozen=True)
class Announcement:
    epoch: int  # communicator generation the sender uses for this transfer; -1 with error
    error: str | None = None  # set when the sender gave up before the data phase
    lane: int = 0  # which of the pair's lanes carries it (its communicator; see lane_id)


class RendezvousHost:
    """Decode side: a TCPStore on a free port of `host` (the interface senders reach)."""

    def __init__(self, host: str = "127.0.0.1"):
        # Bind the listening socket ourselves so the store listens on `host` only; the store
        # takes ownership of the descriptor (and closes it).
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(128)
        self.host = host
        self.port = sock.getsockname()[1]
        self.incarnation = uuid.uuid4().hex  # changes when the receiver restarts
        self._local = threading.local()
        self.store = TCPStore(
            host,
            self.port,
            is_master=True,
            wait_for_workers=False,
            master_listen_fd=sock.detach(),
            timeout=timedelta(seconds=60),
        )

    def info(self, transport: str, receiver_id: str) -> dict[str, Any]:
        return {
            "transport": transport,
            "receiver_id": receiver_id,
            "host": self.host,
            "port": self.port,
            "incarnation": self.incarnation,
        }

    def _client(self) -> TCPStore:
        """This thread's own connection to the store (see the module NOTE)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.store.clone()
        return client

    def pair_store(self, sender_id: str, epoch: int) -> Store:
        return PrefixStore(epoch_prefix(sender_id, epoch), self._client())

    def wait_announcement(self, sender_id: str, transfer_id: str, deadline: Deadline) -> Announcement:
        """Block until the sender announces `transfer_id`; consume the key."""
        key = _announce_key(sender_id, transfer_id)
        store = self._client()
        try:
            store.wait([key], timedelta(seconds=deadline.remaining("waiting for the sender")))
            raw = store.get(key)
        except KVTransferError:
            raise
        except RuntimeError as e:  # DistStoreError on timeout
            raise KVTransferTimeout(
                f"no sender announced the transfer within {deadline.timeout_s:.3g}s ({e})", transfer_id=transfer_id
            ) from e
        store.delete_key(key)
        d = msgpack.unpackb(raw, raw=False)
        lane = int(d.get("lane", 0))
        if not 0 <= lane < MAX_LANES:
            raise KVTransferError(f"announcement names lane {lane}, not in [0, {MAX_LANES})", transfer_id=transfer_id)
        return Announcement(epoch=int(d.get("epoch", -1)), error=d.get("error"), lane=lane)

    def pop_bytes(self, key: str) -> bytes:
        """Read and delete a key the sender set before announcing (e.g. an NCCL unique id)."""
        store = self._client()
        if not store.check([key]):  # get() would block for the store's timeout, not the transfer's
            raise KVTransferError(f"no {key!r} in the rendezvous store: the sender announced a pair "
                                  "generation whose setup is gone (already used, or the store restarted)")
        value = store.get(key)
        store.delete_key(key)
        return value

    def close(self) -> None:
        self.store = None  # type: ignore[assignment]  # the master shuts down with its last ref


class RendezvousClient:
    """Prefill side: a connection to one receiver's store."""

    def __init__(self, info: dict[str, Any], deadline: Deadline):
        self.host = str(info["host"])
        self.port = int(info["port"])
        try:
            self.store = TCPStore(
                self.host,
                self.port,
                is_master=False,
                timeout=timedelta(seconds=deadline.remaining("connecting to the receiver")),
            )
        except RuntimeError as e:
            raise KVTransferError(f"cannot reach the receiver's store at {self.host}:{self.port}: {e}") from e
        self.store.set_timeout(timedelta(seconds=_STORE_OP_TIMEOUT_S))  # for set/add/check

    def new_epoch(self, sender_id: str) -> int:
        return int(self.store.add(f"{pair_prefix(sender_id)}/epoch", 1))

    def pair_store(self, sender_id: str, epoch: int) -> Store:
        """Store for building one communicator, on its own connection (see the module NOTE)."""
        return PrefixStore(epoch_prefix(sender_id, epoch), self.store.clone())

    def announce(self, sender_id: str, transfer_id: str, epoch: int, lane: int = 0) -> None:
        self.store.set(_announce_key(sender_id, transfer_id), msgpack.packb({"epoch": epoch, "lane": lane}))

    def announce_failure(self, sender_id: str, transfer_id: str, reason: str, *, was_announced: bool) -> None:
        """Best effort: tell a receiver not yet past the announcement to give up now.

        If the announcement was already consumed the receiver is in the data phase and learns
        of the failure from the communicator; writing again would leave a key nobody reads.
        """
        key = _announce_key(sender_id, transfer_id)
        try:
            if not was_announced or self.store.check([key]):
                self.store.set(key, msgpack.packb({"epoch": -1, "error": reason[:500]}))
        except RuntimeError:
            pass

    def set_bytes(self, key: str, value: bytes) -> None:
        self.store.set(key, value)


# --------------------------------------------------------------------------------------------
# The pairing skeleton shared by gloo and nccl: everything but the communicator itself.
# --------------------------------------------------------------------------------------------


class PairComm(Protocol):
    """A transport's 2-rank communicator of one pair (rank 0 = sender, rank 1 = receiver)."""

    @property
    def alive(self) -> bool: ...

    def abort(self) -> None:
        """Idempotent, callable from any thread; pending operations on it fail."""


@dataclass
class Pair:
    peer_id: str
    lane: int = 0  # sender side: which of its lanes to this receiver (0 .. max_lanes - 1)
    lock: threading.Lock = field(default_factory=threading.Lock)  # held for a whole transfer
    comm: PairComm | None = None  # live communicator, or None until the next transfer builds one
    epoch: int = -1  # generation of `comm`
    info: dict[str, Any] | None = None  # sender side: the receiver's endpoint info
    client: RendezvousClient | None = None  # sender side: connection to the receiver's store

    def drop_comm(self, comm: PairComm | None = None) -> None:
        """Abort `comm` (default: the pair's current one) and forget it if it is current."""
        current = self.comm
        if comm is None:
            comm = current
        if comm is None:
            return
        if current is comm:
            self.comm = None
        comm.abort()


def release_frames(e: BaseException) -> None:
    """Keep the tracebacks of `e` and its causes as text notes, drop the frames (whose locals
    would otherwise keep a communicator, or buffers mapped from it, alive as long as the error)."""
    seen: set[int] = set()
    exc: BaseException | None = e
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            exc.add_note("".join(traceback.format_tb(exc.__traceback__)).rstrip())
            exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def as_transfer_error(e: Exception, transfer_id: str) -> KVTransferError:
    if isinstance(e, KVTransferError):
        return e
    text = f"{type(e).__name__}: {e}"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return KVTransferTimeout(text, transfer_id=transfer_id)
    return KVTransferError(text, transfer_id=transfer_id)


class _PairTable:
    """The pairs one endpoint holds, one per lane (``lane_id(sender, lane)`` -> Pair), shared by
    the sender and receiver sides. A peer's operations (abort, forget) cover all its lanes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pairs: dict[str, Pair] = {}
        self._pairs_lock = threading.Lock()

    def _lanes_of(self, peer_id: str) -> list[str]:  # under _pairs_lock
        return [k for k in self._pairs if k == peer_id or k.startswith(peer_id + "#")]

    def num_pairs(self) -> int:
        """Live communicators, every lane counted."""
        with self._pairs_lock:
            return sum(1 for p in self._pairs.values() if p.comm is not None and p.comm.alive)

    def abort(self, peer_id: str | None = None) -> None:
        with self._pairs_lock:
            keys = list(self._pairs) if peer_id is None else self._lanes_of(peer_id)
            pairs = [self._pairs[k] for k in keys]
        for pair in pairs:
            pair.drop_comm()

    def forget(self, peer_id: str) -> None:
        with self._pairs_lock:
            pairs = [self._pairs.pop(k) for k in self._lanes_of(peer_id)]
        for pair in pairs:
            pair.drop_comm()


class RendezvousKVSender(_PairTable, KVSender):
    """Sender side of the protocol in base.py; subclasses supply the communicator."""

    recv_during_send = True

    def __init__(self, sender_id: str, *, timeout_s: float = 30.0, max_lanes: int = 4):
        super().__init__(sender_id, timeout_s=timeout_s)
        if not 1 <= max_lanes <= MAX_LANES:
            raise ValueError(f"max_lanes must be in [1, {MAX_LANES}], got {max_lanes}")
        self.max_lanes = max_lanes  # communicators per receiver: transfers in flight side by side
        self._next_wait = 0

    # -- what a transport supplies ---------------------------------------------------------
    def _prepare_comm(self, client: RendezvousClient, wire_id: str, epoch: int) -> Any:
        """Before the announcement: publish what the receiver needs to join lane ``wire_id``
        (``lane_id``) at `epoch`."""
        return None

    @abstractmethod
    def _open_comm(self, client: RendezvousClient, wire_id: str, epoch: int, setup: Any,
                   deadline: Deadline) -> PairComm:
        """Build this side (rank 0) of lane ``wire_id``'s communicator; blocks until the peer joins."""

    @abstractmethod
    def _send_data(self, comm: PairComm, meta: KVTransferMeta, layers: Iterable[Any], deadline: Deadline) -> int:
        """Header, layers, wait for the ack; returns KV payload bytes."""

    @abstractmethod
    def _exchange(self, comm: PairComm, data: bytes, deadline: Deadline) -> bytes:
        """Send 32 bytes to the receiver, then return the 32 it sent (pair authentication)."""

    # -- the protocol ----------------------------------------------------------------------
    def connect(self, peer_id: str, peer_info: dict[str, Any]) -> None:
        if peer_info.get("transport") != self.transport:
            raise KVTransferError(f"peer info is for transport {peer_info.get('transport')!r}, not {self.transport!r}")
        key = peer_info.get("pair_key")
        if not isinstance(key, bytes) or len(key) != PAIR_KEY_BYTES:
            raise KVTransferError(f"peer info for {peer_id!r} has no pair key: get it from the receiver's "
                                  "prepare_pair(sender_id)")
        with self._pairs_lock:
            old = self._pairs.get(peer_id)
            if old is not None and old.info == peer_info:
                return
            stale = [self._pairs.pop(k) for k in self._lanes_of(peer_id)]  # every lane: a new incarnation
            self._pairs[peer_id] = Pair(peer_id, info=dict(peer_info))
        for pair in stale:
            pair.drop_comm()

    def is_connected(self, peer_id: str) -> bool:
        with self._pairs_lock:
            return peer_id in self._pairs

    def send(self, peer_id, meta, layers, timeout_s=None) -> KVSendResult:  # noqa: D102 (see KVSender)
        tid = meta.transfer_id
        deadline = Deadline(self.timeout_s if timeout_s is None else timeout_s, tid)
        self.ledger.set_state(tid, KVTransferState.BOOTSTRAPPING)
        try:
            pair = self._take_lane(peer_id, deadline)
            try:
                num_bytes = self._send_locked(pair, meta, layers, deadline)
            finally:
                pair.lock.release()
        except Exception as e:
            self.ledger.failed(tid)
            if isinstance(e, KVTransferError):
                raise
            raise as_transfer_error(e, tid) from e
        self.ledger.succeeded(tid, num_bytes)
        return KVSendResult(num_bytes, self.make_ticket(peer_id, meta))

    def _take_lane(self, peer_id: str, deadline: Deadline) -> Pair:
        """A lane to ``peer_id``, locked: a free one, else a new one (up to max_lanes), else the
        next busy one in turn, waited for. So a short transfer never queues behind a long one
        while lanes are left (no head-of-line blocking); each lane carries one at a time."""
        tid = deadline.transfer_id
        with self._pairs_lock:
            lanes = sorted((self._pairs[k] for k in self._lanes_of(peer_id)), key=lambda p: p.lane)
            if not lanes:
                raise KVTransferError(f"not connected to receiver {peer_id!r}: call connect() first", transfer_id=tid)
            for pair in lanes:
                if pair.lock.acquire(blocking=False):
                    return pair
            if len(lanes) < self.max_lanes:
                pair = Pair(peer_id, lane=len(lanes), info=lanes[0].info)
                pair.lock.acquire()
                self._pairs[lane_id(peer_id, pair.lane)] = pair
                return pair
            pair = lanes[self._next_wait % len(lanes)]
            self._next_wait += 1
        if not pair.lock.acquire(timeout=deadline.remaining("waiting for a free lane to the receiver")):
            raise KVTransferTimeout("every lane of the pair busy until the deadline", transfer_id=tid)
        return pair

    def _send_locked(self, pair: Pair, meta: KVTransferMeta, layers: Iterable[Any], deadline: Deadline) -> int:
        """Steps 2-5 of the protocol, under the pair lock. On failure: drop the communicator,
        leave word for a receiver still waiting, and reconnect to the store next time."""
        tid = meta.transfer_id
        comm = None
        announced = False
        try:
            if pair.client is None:
                assert pair.info is not None
                pair.client = RendezvousClient(pair.info, deadline)
            wire_id = lane_id(self.sender_id, pair.lane)
            comm = pair.comm
            if comm is None or not comm.alive:
                comm = None
                epoch = pair.client.new_epoch(wire_id)
                setup = self._prepare_comm(pair.client, wire_id, epoch)
                pair.client.announce(self.sender_id, tid, epoch, pair.lane)
                announced = True
                comm = self._open_comm(pair.client, wire_id, epoch, setup, deadline)
                authenticate(lambda data: self._exchange(comm, data, deadline), pair.info["pair_key"], True,
                             wire_id, pair.peer_id, epoch, tid)
                pair.comm, pair.epoch = comm, epoch
                self.ledger.pair_built()
            else:
                pair.client.announce(self.sender_id, tid, pair.epoch, pair.lane)
                announced = True
            self.ledger.set_state(tid, KVTransferState.TRANSFERRING)
            return self._send_data(comm, meta, layers, deadline)
        except BaseException as e:
            if comm is not None:
                pair.drop_comm(comm)
            if pair.client is not None:
                pair.client.announce_failure(self.sender_id, tid, f"{type(e).__name__}: {e}", was_announced=announced)
                pair.client = None
            raise


class RendezvousKVReceiver(_PairTable, KVReceiver):
    """Receiver side of the protocol in base.py; subclasses supply the communicator."""

    def __init__(self, receiver_id: str, *, host: str = "127.0.0.1", timeout_s: float = 30.0):
        super().__init__(receiver_id, timeout_s=timeout_s)
        self.host = host  # interface the store (and gloo) listen on; senders must reach it
        self._rendezvous = RendezvousHost(host)
        self._secret = secrets.token_bytes(PAIR_KEY_BYTES)  # this incarnation's: derives each pair's key

    # -- what a transport supplies ---------------------------------------------------------
    @abstractmethod
    def _open_comm(self, rendezvous: RendezvousHost, sender_id: str, epoch: int, deadline: Deadline) -> PairComm:
        """Join (rank 1) the communicator the sender builds for `epoch`."""

    @abstractmethod
    def _recv_data(self, comm: PairComm, meta: KVTransferMeta, kv: Any, deadline: Deadline) -> int:
        """Header check, layers into kv[:, :, meta.dst_block_ids], send the ack; returns bytes."""

    @abstractmethod
    def _exchange(self, comm: PairComm, data: bytes, deadline: Deadline) -> bytes:
        """Return the 32 bytes the sender sent, then send it 32 (pair authentication)."""

    # -- the protocol ----------------------------------------------------------------------
    def endpoint_info(self) -> dict[str, Any]:
        return self._rendezvous.info(self.transport, self.receiver_id)

    def prepare_pair(self, peer_id: str) -> dict[str, Any]:
        """``endpoint_info()`` plus the key of the pair with sender ``peer_id`` (see ``authenticate``)."""
        return {**self.endpoint_info(), "pair_key": pair_key(self._secret, peer_id)}

    def _pair(self, sender_id: str) -> Pair:
        with self._pairs_lock:
            pair = self._pairs.get(sender_id)
            if pair is None:
                pair = self._pairs[sender_id] = Pair(sender_id)
            return pair

    def recv(self, ticket, kv, dst_block_ids, timeout_s=None) -> int:  # noqa: D102 (see KVReceiver)
        tid = ticket.meta.transfer_id
        deadline = Deadline(self.timeout_s if timeout_s is None else timeout_s, tid)
        self.ledger.set_state(tid, KVTransferState.BOOTSTRAPPING)
        try:
            meta = self._check_ticket(ticket, kv, dst_block_ids)
            # NOTE: wait for *this* transfer's announcement before taking the pair lock, so a
            # thread started early for a later transfer cannot hold the channel (see base.py).
            announcement = self._rendezvous.wait_announcement(ticket.sender_id, tid, deadline)
            if announcement.error is not None:
                raise KVTransferError(f"sender gave up: {announcement.error}", transfer_id=tid)
            wire_id = lane_id(ticket.sender_id, announcement.lane)
            pair = self._pair(wire_id)
            if not pair.lock.acquire(timeout=deadline.remaining("waiting for the pair's previous transfer")):
                raise KVTransferTimeout("pair busy until the deadline", transfer_id=tid)
            comm = None
            try:
                if announcement.epoch < pair.epoch:  # never drop a newer communicator for it
                    raise KVTransferError(
                        f"announcement for epoch {announcement.epoch} but the pair is at {pair.epoch} "
                        "(two senders with one id?)",
                        transfer_id=tid,
                    )
                comm = pair.comm
                if comm is None or not comm.alive or pair.epoch != announcement.epoch:
                    pair.drop_comm()
                    comm = self._open_comm(self._rendezvous, wire_id, announcement.epoch, deadline)
                    authenticate(lambda data: self._exchange(comm, data, deadline),
                                 pair_key(self._secret, ticket.sender_id), False, wire_id,
                                 self.receiver_id, announcement.epoch, tid)
                    pair.comm, pair.epoch = comm, announcement.epoch
                    self.ledger.pair_built()
                self.ledger.set_state(tid, KVTransferState.TRANSFERRING)
                num_bytes = self._recv_data(comm, meta, kv, deadline)
            except BaseException:
                if comm is not None:
                    pair.drop_comm(comm)
                raise
            finally:
                pair.lock.release()
        except Exception as e:
            self.ledger.failed(tid)
            if isinstance(e, KVTransferError):
                raise
            raise as_transfer_error(e, tid) from e
        self.ledger.succeeded(tid, num_bytes)
        return num_bytes

    def close(self) -> None:
        self.abort(None)
        self._rendezvous.close()
