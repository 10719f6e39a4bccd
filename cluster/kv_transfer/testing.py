"""Helpers shared by the KV-transfer tests and benchmarks (not used in serving).

* `CacheSpec` / `make_cache`: a seeded random paged cache, reproducible in any process.
* `KVEndpoint`: one worker's KV side (a cache plus a sender or a receiver); usable as a plain
  object, wrapped by `ray.remote`, or inside `EndpointProcess`.
* `EndpointProcess`: a `KVEndpoint` in a spawned child process, driven over a pipe with msgpack
  messages (the other half of two-process tests).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import torch

from .base import (
    KV_DTYPES,
    KVSendResult,
    KVTicket,
    KVTransferError,
    KVTransferMeta,
    KVTransferTimeout,
    make_kv_receiver,
    make_kv_sender,
)
from .layer_gate import LayerGate
from .layout import block_index, iter_kv_layers


@dataclass(frozen=True)
class CacheSpec:
    num_layers: int = 4
    num_blocks: int = 32
    block_size: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    def make(self) -> torch.Tensor:
        """[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], seeded."""
        shape = (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(shape, generator=g).to(KV_DTYPES[self.dtype]).to(self.device)


def make_cache(**spec: Any) -> torch.Tensor:
    return CacheSpec(**spec).make()


def make_meta(
    spec: CacheSpec, transfer_id: str, src: Iterable[int], dst: Iterable[int], **overrides: Any
) -> KVTransferMeta:
    """Meta moving blocks `src` of a `spec` cache to blocks `dst` of the receiver's."""
    src, dst = tuple(src), tuple(dst)
    fields: dict[str, Any] = dict(
        request_id=f"req-{transfer_id}",
        transfer_id=transfer_id,
        num_layers=spec.num_layers,
        num_blocks=len(src),
        block_size=spec.block_size,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=spec.dtype,
        src_block_ids=src,
        dst_block_ids=dst,
        num_tokens=len(src) * spec.block_size - 1,
    )
    fields.update(overrides)
    return KVTransferMeta(**fields)


def assert_blocks_landed(
    sender_kv: torch.Tensor, receiver_kv: torch.Tensor, before: torch.Tensor, src: Iterable[int], dst: Iterable[int]
) -> None:
    """Destination blocks equal the source blocks bit for bit; every other block untouched."""
    src, dst = list(src), list(dst)
    sender_kv, receiver_kv, before = sender_kv.cpu(), receiver_kv.cpu(), before.cpu()
    assert torch.equal(receiver_kv[:, :, dst], sender_kv[:, :, src]), "destination blocks differ from the source"
    others = [b for b in range(receiver_kv.shape[2]) if b not in set(dst)]
    assert torch.equal(receiver_kv[:, :, others], before[:, :, others]), "a block outside the destination changed"


def shm_rings_held(pid: int | None = None) -> int:
    """How many shm-transport rings process `pid` (default: this one) still maps or holds open."""
    from .shm import RING_NAME  # transports load only when used

    proc = f"/proc/{os.getpid() if pid is None else pid}"
    marker = f"/memfd:{RING_NAME} "
    inodes = set()
    with open(f"{proc}/maps") as f:
        for line in f:
            if marker in line:
                inodes.add(int(line.split()[4]))
    for fd in os.listdir(f"{proc}/fd"):
        with contextlib.suppress(OSError):  # closed while we looked
            if os.readlink(f"{proc}/fd/{fd}").startswith(marker.rstrip()):
                inodes.add(os.stat(f"{proc}/fd/{fd}").st_ino)
    return len(inodes)


class PrefillCrashed(RuntimeError):
    """Raised by `scripted_layers` to play a prefill that fails between layers."""


def scripted_layers(
    layers: Iterable[torch.Tensor],
    *,
    stall_after: int | None = None,
    stall_s: float = 0.0,
    fail_after: int | None = None,
) -> Iterable[torch.Tensor]:
    """Yield `layers`; after the first `stall_after` sleep `stall_s` (a slow prefill); after the
    first `fail_after` raise PrefillCrashed. No script: `layers` itself, so a transport sees an
    `iter_kv_layers` result as the workers pass it."""
    if stall_after is None and fail_after is None:
        return layers
    return _scripted(layers, stall_after, stall_s, fail_after)


def _scripted(layers: Iterable[torch.Tensor], stall_after: int | None, stall_s: float,
              fail_after: int | None) -> Iterator[torch.Tensor]:
    for i, layer in enumerate(layers):
        if stall_after is not None and i == stall_after:
            time.sleep(stall_s)
        if fail_after is not None and i == fail_after:
            raise PrefillCrashed(f"prefill failed before layer {i}")
        yield layer


def gated_compute(num_layers: int, every_s: float, fail_after: int | None = None,
                  stall_after: int | None = None) -> LayerGate:
    """A gate opened by a thread playing a prefill step: layer l is written at (l + 1) x every_s;
    with `fail_after`, the step fails after that many layers; with `stall_after`, it stops there."""
    gate = LayerGate(num_layers)

    def step() -> None:
        for layer in range(num_layers):
            time.sleep(every_s)
            if fail_after is not None and layer == fail_after:
                gate.fail(PrefillCrashed(f"prefill step failed in layer {layer}"))
                return
            if stall_after is not None and layer == stall_after:
                return
            gate.layer_done(layer)

    threading.Thread(target=step, daemon=True).start()
    return gate


class KVEndpoint:
    """A worker's KV side for tests: a seeded cache plus a sender (role "sender") or receiver."""

    def __init__(self, role: str, transport: str, endpoint_id: str, cache: dict[str, Any], **opts: Any):
        self.kv = CacheSpec(**cache).make()
        self.sender = make_kv_sender(transport, sender_id=endpoint_id, **opts) if role == "sender" else None
        self.receiver = make_kv_receiver(transport, receiver_id=endpoint_id, **opts) if role == "receiver" else None

    def pair_info(self, sender_id: str) -> dict[str, Any]:
        """What sender ``sender_id`` connects with (``prepare_pair``: with the pair's key)."""
        assert self.receiver is not None
        return self.receiver.prepare_pair(sender_id)

    def connect(self, peer_id: str, info: dict[str, Any]) -> None:
        assert self.sender is not None
        self.sender.connect(peer_id, info)

    def send(
        self,
        peer_id: str,
        meta: KVTransferMeta,
        *,
        timeout_s: float | None = None,
        **script: Any,
    ) -> KVSendResult:
        """Send `meta.src_block_ids`; `script` goes to `scripted_layers` (stalls, failures), or,
        with `gate_every_s`, to `gated_compute` (layers read as a prefill step writes them)."""
        assert self.sender is not None
        if "gate_every_s" in script:
            gate = gated_compute(self.kv.shape[0], script["gate_every_s"], script.get("gate_fail_after"),
                                 script.get("gate_stall_after"))
            layers = iter_kv_layers(self.kv, meta.src_block_ids, gate, timeout_s)
        else:
            layers = scripted_layers(iter_kv_layers(self.kv, meta.src_block_ids), **script)
        return self.sender.send(peer_id, meta, layers, timeout_s)

    def recv(self, ticket: KVTicket, timeout_s: float | None = None) -> int:
        assert self.receiver is not None
        return self.receiver.recv(ticket, self.kv, ticket.meta.dst_block_ids, timeout_s)

    def blocks(self, block_ids: Iterable[int]) -> torch.Tensor:
        """kv[:, :, block_ids] on CPU: [num_layers, 2, n, bs, H, D]."""
        return self.kv.index_select(2, block_index(list(block_ids), self.kv.device)).cpu()

    def stats(self) -> dict[str, int]:
        endpoint = self.sender or self.receiver
        assert endpoint is not None
        return endpoint.stats().to_dict()

    def close(self) -> None:
        for endpoint in (self.sender, self.receiver):
            if endpoint is not None:
                endpoint.close()


# -- child process ---------------------------------------------------------------------------


def _ticket_to_wire(ticket: KVTicket) -> dict[str, Any]:
    assert not ticket.payload, "only rendezvous tickets cross the test pipe"
    return {"transport": ticket.transport, "sender_id": ticket.sender_id, "receiver_id": ticket.receiver_id,
            "meta": ticket.meta.to_msgpack()}


def _ticket_from_wire(d: dict[str, Any]) -> KVTicket:
    return KVTicket(d["transport"], d["sender_id"], d["receiver_id"], KVTransferMeta.from_msgpack(d["meta"]))


def _serve_together(endpoint: KVEndpoint, msg: dict[str, Any]) -> dict[str, Any]:
    """Run ``msg["ops"]`` at once, each in its own thread after its ``delay_s``; their replies, in order."""
    replies: list[dict[str, Any] | None] = [None] * len(msg["ops"])

    def run(i: int, sub: dict[str, Any]) -> None:
        time.sleep(sub.pop("delay_s", 0.0))
        replies[i] = _serve(endpoint, sub)

    threads = [threading.Thread(target=run, args=(i, dict(sub))) for i, sub in enumerate(msg["ops"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"ok": all(r["ok"] for r in replies), "replies": replies}


def _serve(endpoint: KVEndpoint, msg: dict[str, Any]) -> dict[str, Any]:
    op = msg["op"]
    t0 = time.perf_counter()
    try:
        if op == "together":
            return _serve_together(endpoint, msg)
        if op == "info":
            return {"ok": True, "info": endpoint.pair_info(msg["sender_id"])}
        if op == "connect":
            endpoint.connect(msg["peer_id"], msg["info"])
            return {"ok": True}
        if op == "send":
            script = {k: msg[k] for k in ("stall_after", "stall_s", "fail_after", "gate_every_s", "gate_fail_after",
                                          "gate_stall_after") if k in msg}
            result = endpoint.send(
                msg["peer_id"], KVTransferMeta.from_msgpack(msg["meta"]), timeout_s=msg.get("timeout_s"), **script
            )
            return {"ok": True, "num_bytes": result.num_bytes, "elapsed_s": time.perf_counter() - t0}
        if op == "recv":
            num_bytes = endpoint.recv(_ticket_from_wire(msg["ticket"]), msg.get("timeout_s"))
            return {"ok": True, "num_bytes": num_bytes, "elapsed_s": time.perf_counter() - t0}
        if op == "blocks":
            t = endpoint.blocks(msg["block_ids"])
            return {"ok": True, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                    "data": t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()}
        if op == "stats":
            return {"ok": True, "stats": endpoint.stats()}
        raise ValueError(f"unknown op {op!r}")
    except Exception as e:  # reply with any failure: the parent must never wait for a dead loop
        error = str(e) if isinstance(e, KVTransferError) else f"{type(e).__name__}: {e}"
        return {"ok": False, "error": error, "timeout": isinstance(e, KVTransferTimeout),
                "elapsed_s": time.perf_counter() - t0}


def _child_main(conn, role: str, transport: str, endpoint_id: str, cache: bytes, opts: bytes,
                torch_threads: int | None) -> None:
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        endpoint = KVEndpoint(role, transport, endpoint_id, msgpack.unpackb(cache), **msgpack.unpackb(opts))
    except Exception as e:  # report instead of dying silently
        error = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        conn.send_bytes(msgpack.packb(error))
        return
    conn.send_bytes(msgpack.packb({"ok": True}))
    while True:
        msg = msgpack.unpackb(conn.recv_bytes())
        if msg["op"] == "close":
            endpoint.close()
            conn.send_bytes(msgpack.packb({"ok": True}))
            return
        conn.send_bytes(msgpack.packb(_serve(endpoint, msg)))


class EndpointProcess:
    """A `KVEndpoint` in a spawned child; `request` then `reply` to overlap with local work."""

    def __init__(self, role: str, transport: str, endpoint_id: str, cache: CacheSpec, start_timeout_s: float = 60.0,
                 torch_threads: int | None = None, **opts: Any):
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.transport = transport
        self.process = ctx.Process(
            target=_child_main,
            args=(child_conn, role, transport, endpoint_id, msgpack.packb(asdict(cache)), msgpack.packb(opts),
                  torch_threads),
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        ready = self.reply(start_timeout_s)
        if not ready["ok"]:
            self.close()
            raise RuntimeError(f"endpoint process failed to start: {ready['error']}\n{ready.get('trace', '')}")

    def request(self, op: str, **kwargs: Any) -> None:
        if "ticket" in kwargs:
            kwargs["ticket"] = _ticket_to_wire(kwargs["ticket"])
        if isinstance(kwargs.get("meta"), KVTransferMeta):
            kwargs["meta"] = kwargs["meta"].to_msgpack()
        self._conn.send_bytes(msgpack.packb({"op": op, **kwargs}))

    def reply(self, timeout_s: float = 60.0) -> dict[str, Any]:
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"no reply from the endpoint process within {timeout_s}s")
        return msgpack.unpackb(self._conn.recv_bytes())

    def call(self, op: str, *, reply_timeout_s: float = 60.0, **kwargs: Any) -> dict[str, Any]:
        self.request(op, **kwargs)
        return self.reply(reply_timeout_s)

    def blocks(self, block_ids: Iterable[int]) -> torch.Tensor:
        r = self.call("blocks", block_ids=list(block_ids))
        flat = torch.frombuffer(bytearray(r["data"]), dtype=torch.uint8)
        return flat.view(KV_DTYPES[r["dtype"]]).view(r["shape"])

    def close(self, timeout_s: float = 10.0) -> None:
        if self.process.is_alive():
            try:
                self.call("close", reply_timeout_s=timeout_s)
            except (TimeoutError, OSError, EOFError):
                pass
            self.process.join(timeout_s)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout_s)
        self._conn.close()

    def __enter__(self) -> EndpointProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
