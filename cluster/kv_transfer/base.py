"""KV-cache transfer: contracts, protocol and transport registry.

A prefill worker (the *sender*, P) ships a request's KV cache to the decode worker (the *receiver*,
D) that reserved blocks for it. Both are Ray actors; this package is the wire between them.

Cache layout (one tensor per worker, fixed by the model code)::

    kv: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   # dim 1: 0 = K, 1 = V
                          ^^^^^^^^^^ paged: a request owns a list of block ids

The unit on the wire is one layer of one request: ``kv[layer][:, block_ids]``, a contiguous
``[2, n, block_size, num_kv_heads, head_dim]`` tensor sent raw. The receiver lands it in a
staging buffer and scatters it into its own (different) block ids. Sending layer by layer lets
the sender start while later layers are still being computed (``layers`` is an iterator).

Two transport styles
--------------------
* **Rendezvous** (``gloo``, ``shm``, ``nccl``; ``recv_during_send = True``): a 2-rank
  communicator per (P, D) pair (``shm``: a shared-memory ring and a unix socket, same host only).
  ``recv`` must run concurrently with ``send`` (the decode actor runs it in a worker thread).
  The ticket the receiver needs is known before sending: ``sender.make_ticket(peer, meta)``.
* **Handoff** (``ray``, ``local``; ``recv_during_send = False``): ``send`` stores the layers
  somewhere and returns the ticket naming them; ``recv(ticket)`` runs afterwards.

``auto`` (the default, auto.py) is not a wire of its own: per pair it uses ``shm`` when the
receiver is on this host and ``gloo`` otherwise, and its tickets name the one used.

:func:`run_kv_transfer` drives either style in the right order.

Pairing (rendezvous transports)
-------------------------------
There is no global process group: pools scale and pairs come and go. Each receiver hosts one
TCPStore (the *rendezvous store*) for all its senders; ``receiver.prepare_pair(sender_id)``
(or ``endpoint_info()``) returns a msgpack-able dict ``{transport, receiver_id, host, port,
incarnation}`` that the lead passes to ``sender.connect(receiver_id, info)`` through a Ray call.
It is the same for every sender (but for ``pair_key``, the key of that one pair, which proves
both ends at every new communicator: see ``rendezvous.authenticate``) and changes only if the
receiver restarts (new incarnation: call ``connect`` again; that drops the old pair). Nothing is
opened until the first ``send``.

Lanes: a sender may open up to ``max_lanes`` communicators to one receiver, each carrying one
transfer at a time, so a short transfer never waits behind a long one while a lane is free. Lane
k goes by ``lane_id(sender, k)`` (``<sender_id>#k``; lane 0 is ``<sender_id>``) in every key
below but the announcement, which stays under the sender's own id and names the lane. All store
keys of a lane live under ``kv/<lane id>/``:

=============================  ===============================================================
``epoch``                      counter; ``add(1)`` names a new communicator generation
``<epoch>/...``                the communicator's own rendezvous (gloo keys, NCCL unique id,
                               shm socket name)
``xfer/<transfer_id>``         the *announcement*: msgpack ``{"epoch": e, "lane": k}`` or
                               ``{"error": s}`` (under the sender's own id)
=============================  ===============================================================

One transfer, in order::

    P.send(D, meta, layers)                         D.recv(ticket, kv, dst_block_ids)
    1. lock(a lane to D)      [free, new, or wait]  1. wait for key xfer/<tid>   [deadline]
    2. no communicator? epoch = add(epoch, 1)          read epoch, delete key
       (nccl, shm: set <epoch>/uid, shm_socket)     2. lock(lane k of P)
    3. set xfer/<tid> = {epoch}  ------------->     3. communicator epoch != e?
    4. new communicator? build (rank 0) <------>       abort old, build at e (rank 1)
       mutual nonce + HMAC proof        <------>       (refused: KVPeerRefused, nothing moves)
    5. header (meta)                    ------->    4. recv header, check == ticket.meta
       layer 0 .. L-1 (pipelined)       ------->    5. recv layers to staging, scatter
       wait ack                         <-------    6. send ack
    6. unlock, SUCCESS                              7. unlock, SUCCESS

Why two transfers on one lane cannot interleave: the sender holds the lane's lock from the
announcement to the ack, so announcements of one lane are issued one at a time, each after the
previous transfer was acknowledged (or failed). A receiver thread waits for its own
``transfer_id``'s announcement *before* taking its pair lock, so it cannot grab the channel while
another transfer is on it, whatever order the decode actor's threads start in. The header check
catches anything else (a stale ticket, a mismatched meta) before a byte lands in the cache.
(gloo sends the msgpack meta, length-prefixed; nccl a fixed 64-byte digest of it, since NCCL
needs equal counts on both ends.)

States: ``BOOTSTRAPPING`` (waiting for the peer / building the communicator) ->
``TRANSFERRING`` (header and layers moving) -> ``SUCCESS | FAILED``.

Failures: every blocking step runs under the transfer's deadline (``timeout_s`` covers the whole
transfer, including time the sender's layer iterator spends computing). On any error or timeout
the side that saw it aborts and drops the pair's communicator, marks the transfer ``FAILED`` and
raises :class:`KVTransferError` (:class:`KVTransferTimeout` for deadlines). The peer's pending
operations then fail or time out. The next transfer on the pair starts a new epoch, so the pair
recovers with no extra Ray round trip. A sender that fails before the receiver picked up the
announcement (e.g. the pair setup timed out) overwrites it with ``{"error": ...}``, so a late
receiver fails at once instead of waiting out its deadline. After a failure the sender also
reopens its store connection on the next transfer. Blocks a failed ``recv`` was writing may
hold partial data: the caller frees or re-fills them.

Transports are registered by name and imported only when chosen (a CPU machine never imports
the NCCL module unless asked): :func:`make_kv_sender` / :func:`make_kv_receiver`.
"""

from __future__ import annotations

import enum
import importlib
import threading
import time
import contextlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import msgpack
import torch

__all__ = [
    "KV_DTYPES",
    "KV_TRANSPORTS",
    "KVReceiver",
    "KVSendResult",
    "KVSender",
    "KVTicket",
    "KVTransferError",
    "KVTransferMeta",
    "KVTransferState",
    "KVTransferStats",
    "KVTransferTimeout",
    "make_kv_receiver",
    "make_kv_sender",
    "run_kv_transfer",
]

# dtype name on the wire -> torch dtype. Names are torch's (str(torch.bfloat16) minus "torch.").
KV_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_META_VERSION = 1


class KVTransferError(RuntimeError):
    """A KV transfer failed. The pair is already reset; the caller frees or retries."""

    def __init__(self, message: str, *, transfer_id: str | None = None):
        super().__init__(message if transfer_id is None else f"[{transfer_id}] {message}")
        self.transfer_id = transfer_id


class KVTransferTimeout(KVTransferError):
    """A KV transfer ran past its deadline (no peer, stalled peer, slow layers)."""


class KVTransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"  # waiting for the peer / building the pair's communicator
    TRANSFERRING = "transferring"  # header and layers moving
    SUCCESS = "success"
    FAILED = "failed"


@dataclass(frozen=True)
class KVTransferMeta:
    """What one transfer moves; msgpack on the wire, identical on both ends."""

    request_id: str
    transfer_id: str  # unique per transfer attempt (a retry gets a new one); ints become str
    num_layers: int
    num_blocks: int  # blocks moved = len(src_block_ids) = len(dst_block_ids)
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    dtype: str  # key of KV_DTYPES: "float32" | "bfloat16" | "float16"
    src_block_ids: tuple[int, ...]  # block ids in the sender's cache
    dst_block_ids: tuple[int, ...]  # reserved block ids in the receiver's cache
    num_tokens: int  # prompt tokens held by these blocks (<= num_blocks * block_size)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "transfer_id", str(self.transfer_id))
        set_(self, "src_block_ids", tuple(int(b) for b in self.src_block_ids))
        set_(self, "dst_block_ids", tuple(int(b) for b in self.dst_block_ids))
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim", "num_tokens"):
            set_(self, name, int(getattr(self, name)))
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not in {sorted(KV_DTYPES)}")
        if min(self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim) < 1:
            raise ValueError(f"non-positive size in {self}")
        if not len(self.src_block_ids) == len(self.dst_block_ids) == self.num_blocks:
            raise ValueError(
                f"num_blocks={self.num_blocks} but {len(self.src_block_ids)} src and "
                f"{len(self.dst_block_ids)} dst block ids"
            )
        if len(set(self.dst_block_ids)) != self.num_blocks:
            raise ValueError("dst_block_ids has duplicates")
        if not 0 <= self.num_tokens <= self.num_blocks * self.block_size:
            raise ValueError(f"num_tokens={self.num_tokens} does not fit {self.num_blocks} blocks")

    @property
    def torch_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.dtype]

    @property
    def layer_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one layer on the wire: [2, num_blocks, block_size, num_kv_heads, head_dim]."""
        return (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def layer_num_bytes(self) -> int:
        n = 1
        for d in self.layer_shape:
            n *= d
        return n * self.torch_dtype.itemsize

    @property
    def num_bytes(self) -> int:
        """KV payload of the whole transfer (all layers), headers excluded."""
        return self.layer_num_bytes * self.num_layers

    def to_msgpack(self) -> bytes:
        d = {f.name: getattr(self, f.name) for f in fields(self)}  # (asdict deep-copies: 40x slower)
        d["v"] = _META_VERSION
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data: bytes) -> KVTransferMeta:
        try:
            d = msgpack.unpackb(data, raw=False)
            if not isinstance(d, dict) or d.pop("v", None) != _META_VERSION:
                raise ValueError("unknown meta version")
            return cls(**d)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise KVTransferError(f"bad KV transfer meta: {e}") from e

    @classmethod
    def for_cache(
        cls,
        kv: torch.Tensor,
        *,
        request_id: str,
        transfer_id: str,
        src_block_ids: Iterable[int],
        dst_block_ids: Iterable[int],
        num_tokens: int | None = None,
    ) -> KVTransferMeta:
        """Meta for moving `src_block_ids` of `kv` (the sender's cache) to `dst_block_ids`."""
        num_layers, two, _, block_size, num_kv_heads, head_dim = kv.shape
        assert two == 2, f"kv must be [L, 2, blocks, bs, H, D], got {tuple(kv.shape)}"
        src, dst = tuple(src_block_ids), tuple(dst_block_ids)
        return cls(
            request_id=request_id,
            transfer_id=transfer_id,
            num_layers=num_layers,
            num_blocks=len(src),
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=dtype_name(kv.dtype),
            src_block_ids=src,
            dst_block_ids=dst,
            num_tokens=len(src) * block_size if num_tokens is None else num_tokens,
        )


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in KV_DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}; expected one of {sorted(KV_DTYPES)}")


@dataclass(frozen=True)
class KVTicket:
    """What the receiver's `recv` needs: passed from the prefill side to the decode actor by Ray.

    For rendezvous transports it is known before sending (`KVSender.make_ticket`); for handoff
    transports `send` returns it and `payload` names the data (Ray ObjectRefs, one per layer).
    """

    transport: str
    sender_id: str
    receiver_id: str
    meta: KVTransferMeta
    payload: tuple[Any, ...] = ()


@dataclass(frozen=True)
class KVSendResult:
    num_bytes: int  # KV payload moved (all layers)
    ticket: KVTicket  # hand this to the receiver (after send for handoff transports)


@dataclass(frozen=True)
class KVTransferStats:
    """Counters of one endpoint, for cluster status."""

    num_bytes: int  # KV payload of successful transfers
    num_ok: int
    num_failed: int
    num_pairs: int  # pairs with a live communicator now
    num_pair_setups: int  # communicators built so far (first use + re-creations)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class TransferLedger:
    """Thread-safe counters and recent per-transfer states of one endpoint."""

    def __init__(self, max_states: int = 4096):
        self._lock = threading.Lock()
        self._states: OrderedDict[str, KVTransferState] = OrderedDict()
        self._max_states = max_states
        self.num_bytes = self.num_ok = self.num_failed = self.num_pair_setups = 0

    def set_state(self, transfer_id: str, state: KVTransferState) -> None:
        with self._lock:
            self._states[transfer_id] = state
            self._states.move_to_end(transfer_id)
            while len(self._states) > self._max_states:
                self._states.popitem(last=False)

    def state(self, transfer_id: str) -> KVTransferState | None:
        with self._lock:
            return self._states.get(str(transfer_id))

    def succeeded(self, transfer_id: str, num_bytes: int) -> None:
        self.set_state(transfer_id, KVTransferState.SUCCESS)
        with self._lock:
            self.num_ok += 1
            self.num_bytes += num_bytes

    def failed(self, transfer_id: str) -> None:
        self.set_state(transfer_id, KVTransferState.FAILED)
        with self._lock:
            self.num_failed += 1

    @contextlib.contextmanager
    def tracking(self, transfer_id: str):
        """TRANSFERRING for the block's duration; any failure inside is recorded as FAILED and
        raised as a ``KVTransferError``. The caller records success (``succeeded``) after it."""
        self.set_state(transfer_id, KVTransferState.TRANSFERRING)
        try:
            yield
        except KVTransferError:
            self.failed(transfer_id)
            raise
        except Exception as e:
            self.failed(transfer_id)
            raise KVTransferError(f"{type(e).__name__}: {e}", transfer_id=transfer_id) from e

    def pair_built(self) -> None:
        with self._lock:
            self.num_pair_setups += 1

    def stats(self, num_pairs: int) -> KVTransferStats:
        with self._lock:
            return KVTransferStats(self.num_bytes, self.num_ok, self.num_failed, num_pairs, self.num_pair_setups)


@dataclass
class Deadline:
    """Absolute deadline of one transfer; every blocking step asks it for its share."""

    timeout_s: float
    transfer_id: str | None = None
    expires_at: float = field(init=False)

    def __post_init__(self) -> None:
        self.expires_at = time.monotonic() + self.timeout_s

    def remaining(self, what: str = "transfer") -> float:
        """Seconds left (>= 1 ms); raises KVTransferTimeout once expired."""
        left = self.expires_at - time.monotonic()
        if left <= 0:
            raise KVTransferTimeout(f"{what} timed out after {self.timeout_s:.3g}s", transfer_id=self.transfer_id)
        return max(left, 1e-3)


class KVSender(ABC):
    """Prefill side. One instance per worker; thread-safe; one pair per receiver."""

    transport: ClassVar[str]
    recv_during_send: ClassVar[bool]  # True: start recv before send returns (make_ticket)

    def __init__(self, sender_id: str, *, timeout_s: float = 30.0):
        self.sender_id = sender_id  # unique among senders of the cluster (e.g. the actor name)
        self.timeout_s = timeout_s  # default deadline of one send
        self.ledger = TransferLedger()

    @abstractmethod
    def connect(self, peer_id: str, peer_info: dict[str, Any]) -> None:
        """Record the receiver's `prepare_pair`/`endpoint_info` dict. Opens nothing (lazy);
        calling it again with a new incarnation of the receiver drops the old pair."""

    @abstractmethod
    def is_connected(self, peer_id: str) -> bool:
        """Whether `connect` was called for this receiver (not whether a communicator is live)."""

    @abstractmethod
    def send(
        self,
        peer_id: str,
        meta: KVTransferMeta,
        layers: Iterable[torch.Tensor],
        timeout_s: float | None = None,
    ) -> KVSendResult:
        """Send `meta.num_layers` layer tensors [2, n, bs, H, D] (`meta.dtype`) in order.

        Returns once the receiver acknowledged the data (rendezvous) or the data is stored
        (handoff). Raises KVTransferError (KVTransferTimeout past the deadline)."""

    @abstractmethod
    def abort(self, peer_id: str | None = None) -> None:
        """Tear down the pair with `peer_id` (all pairs if None); in-flight sends on it fail."""

    def forget(self, peer_id: str) -> None:
        """The receiver left for good (scaled down, dead): abort the pair and drop what was kept
        for it (its info, the store connection). Connecting again starts from scratch."""
        self.abort(peer_id)

    def make_ticket(self, peer_id: str, meta: KVTransferMeta) -> KVTicket:
        return KVTicket(self.transport, self.sender_id, peer_id, meta)

    def num_pairs(self) -> int:
        return 0

    def stats(self) -> KVTransferStats:
        return self.ledger.stats(self.num_pairs())

    def transfer_state(self, transfer_id: str) -> KVTransferState | None:
        return self.ledger.state(transfer_id)

    def close(self) -> None:
        self.abort(None)


class KVReceiver(ABC):
    """Decode side. One instance per worker; `recv` may run in several threads at once."""

    transport: ClassVar[str]

    def __init__(self, receiver_id: str, *, timeout_s: float = 30.0):
        self.receiver_id = receiver_id  # unique among receivers of the cluster
        self.timeout_s = timeout_s  # default deadline of one recv
        self.ledger = TransferLedger()

    @abstractmethod
    def endpoint_info(self) -> dict[str, Any]:
        """Msgpack-able dict a sender needs to reach this receiver (same for every sender)."""

    def prepare_pair(self, peer_id: str) -> dict[str, Any]:
        """Info for sender `peer_id`'s `connect`. Cheap and idempotent; opens nothing."""
        return self.endpoint_info()

    @abstractmethod
    def recv(
        self,
        ticket: KVTicket,
        kv: torch.Tensor,
        dst_block_ids: Iterable[int],
        timeout_s: float | None = None,
    ) -> int:
        """Receive the transfer `ticket` names into `kv[:, :, dst_block_ids]`; returns bytes.

        `dst_block_ids` (the caller's reservation) must equal `ticket.meta.dst_block_ids`.
        Raises KVTransferError (KVTransferTimeout past the deadline); other blocks untouched."""

    @abstractmethod
    def abort(self, peer_id: str | None = None) -> None:
        """Tear down the pair with sender `peer_id` (all if None); in-flight recvs on it fail."""

    def forget(self, peer_id: str) -> None:
        """The sender left for good: abort the pair and drop its record."""
        self.abort(peer_id)

    def num_pairs(self) -> int:
        return 0

    def stats(self) -> KVTransferStats:
        return self.ledger.stats(self.num_pairs())

    def transfer_state(self, transfer_id: str) -> KVTransferState | None:
        return self.ledger.state(transfer_id)

    def close(self) -> None:
        self.abort(None)

    def _check_ticket(self, ticket: KVTicket, kv: torch.Tensor, dst_block_ids: Iterable[int]) -> KVTransferMeta:
        """Validate a ticket against this receiver and the destination cache."""
        meta = ticket.meta
        tid = meta.transfer_id
        if ticket.transport != self.transport:
            raise KVTransferError(
                f"ticket is for transport {ticket.transport!r}, not {self.transport!r}", transfer_id=tid
            )
        if ticket.receiver_id != self.receiver_id:
            raise KVTransferError(
                f"ticket is for receiver {ticket.receiver_id!r}, not {self.receiver_id!r}", transfer_id=tid
            )
        if tuple(int(b) for b in dst_block_ids) != meta.dst_block_ids:
            raise KVTransferError("dst_block_ids differ from the ticket's meta", transfer_id=tid)
        expected = (meta.num_layers, 2, meta.block_size, meta.num_kv_heads, meta.head_dim)
        got = (kv.shape[0], kv.shape[1], *kv.shape[3:]) if kv.dim() == 6 else tuple(kv.shape)
        if got != expected or kv.dtype != meta.torch_dtype:
            raise KVTransferError(
                f"cache {tuple(kv.shape)} {kv.dtype} does not fit meta "
                f"[{meta.num_layers}, 2, *, {meta.block_size}, {meta.num_kv_heads}, {meta.head_dim}] {meta.dtype}",
                transfer_id=tid,
            )
        if max(meta.dst_block_ids) >= kv.shape[2] or min(meta.dst_block_ids) < 0:
            raise KVTransferError(f"dst block id out of range [0, {kv.shape[2]})", transfer_id=tid)
        return meta


# name -> (module, sender class, receiver class); imported only when chosen.
_TRANSPORTS: dict[str, tuple[str, str, str]] = {
    "gloo": ("cluster.kv_transfer.gloo", "GlooKVSender", "GlooKVReceiver"),
    "nccl": ("cluster.kv_transfer.nccl", "NcclKVSender", "NcclKVReceiver"),
    "ray": ("cluster.kv_transfer.ray_store", "RayKVSender", "RayKVReceiver"),
    "local": ("cluster.kv_transfer.local", "LocalKVSender", "LocalKVReceiver"),
    "shm": ("cluster.kv_transfer.shm", "ShmKVSender", "ShmKVReceiver"),
    "auto": ("cluster.kv_transfer.auto", "AutoKVSender", "AutoKVReceiver"),  # shm on one host, else gloo
}
KV_TRANSPORTS: tuple[str, ...] = tuple(_TRANSPORTS)


def _transport_class(name: str, index: int) -> type:
    if name not in _TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; choose one of {list(KV_TRANSPORTS)}")
    module = importlib.import_module(_TRANSPORTS[name][0])
    return getattr(module, _TRANSPORTS[name][index])


def make_kv_sender(name: str, **opts: Any) -> KVSender:
    """Build the sender of transport `name` ("auto" | "gloo" | "shm" | "nccl" | "ray" | "local")."""
    return _transport_class(name, 1)(**opts)


def make_kv_receiver(name: str, **opts: Any) -> KVReceiver:
    """Build the receiver of transport `name` ("auto" | "gloo" | "shm" | "nccl" | "ray" | "local")."""
    return _transport_class(name, 2)(**opts)


R = TypeVar("R")


def run_kv_transfer(
    sender: KVSender,
    peer_id: str,
    meta: KVTransferMeta,
    layers: Iterable[torch.Tensor],
    start_recv: Callable[[KVTicket], R],
    timeout_s: float | None = None,
) -> tuple[KVSendResult, R]:
    """Run one transfer in the order the transport needs.

    `start_recv(ticket)` must *start* the receiver's `recv` and return without waiting for it
    (e.g. ``lambda t: decode_actor.recv_kv.remote(t)``); its return value comes back so the
    caller can wait on it. Rendezvous transports call it before sending, handoff ones after.
    """
    if sender.recv_during_send:
        handle = start_recv(sender.make_ticket(peer_id, meta))
        return sender.send(peer_id, meta, layers, timeout_s), handle
    result = sender.send(peer_id, meta, layers, timeout_s)
    return result, start_recv(result.ticket)
