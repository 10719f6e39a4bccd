"""KV-transfer bandwidth of each CPU transport against this machine's memcpy, by payload size.

Both ends are real processes on their own cores, driven through ``cluster.kv_transfer`` exactly
as the workers use it:

* gloo and shm (rendezvous): a sender and a receiver ``EndpointProcess`` (spawned children,
  pinned); the time of one transfer is the sender's ``send`` (gather, wire, the receiver's
  scatter, ack).
* ray (handoff): two Ray actors; ``send`` (``ray.put`` per layer) then ``recv`` (``ray.get`` +
  scatter), timed inside the actors and added.
* memcpy: ``torch`` ``copy_`` of the same number of bytes on one core (one thread), the bound a
  single-core transport is measured against.

Bandwidth is payload bytes / seconds (median of ``repeats`` after one warm-up transfer, which
also builds the pair's communicator). Every endpoint runs as many torch threads as it has cores,
as a worker does (``torch_threads``): more threads than cores makes each copy wait on the others.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, replace
from typing import Any

import torch

from benchmarks.affinity import pin_process, pin_self
from cluster.kv_transfer import KVTicket
from cluster.kv_transfer.testing import CacheSpec, EndpointProcess, KVEndpoint, make_meta
from cluster.kv_transfer.testing import _ticket_to_wire as _ticket_wire

# One block of this cache is 256 KiB over 4 layers: [4 layers, K+V, 16 tokens, 8 heads, 64] float32.
CACHE = CacheSpec(num_layers=4, num_blocks=1, block_size=16, num_kv_heads=8, head_dim=64, dtype="float32")
BLOCK_BYTES = CACHE.num_layers * 2 * CACHE.block_size * CACHE.num_kv_heads * CACHE.head_dim * 4


def memcpy_gbps(num_bytes: int, repeats: int) -> float:
    """Single-thread copy bandwidth of this process, GB/s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in
        times = []
        for _ in range(max(repeats, 3)):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
        return num_bytes / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(threads)


def _metas(spec: CacheSpec, num_blocks: int, tag: str, repeats: int):
    blocks = list(range(num_blocks))
    return [make_meta(spec, f"{tag}-{i}", blocks, blocks, num_tokens=num_blocks * spec.block_size)
            for i in range(repeats + 1)]


def rendezvous_gbps(transport: str, block_counts: list[int], repeats: int, send_cores: list[int],
                    recv_cores: list[int], timeout_s: float = 120.0) -> list[dict[str, Any]]:
    spec = replace(CACHE, num_blocks=max(block_counts))
    rows = []
    with EndpointProcess("receiver", transport, "bench-decode", replace(spec, seed=1), timeout_s=timeout_s,
                         torch_threads=len(recv_cores)) as recv, \
            EndpointProcess("sender", transport, "bench-prefill", spec, timeout_s=timeout_s,
                            torch_threads=len(send_cores)) as send:
        pin_process(recv.process.pid, recv_cores)
        pin_process(send.process.pid, send_cores)
        info = recv.call("info", sender_id="bench-prefill")["info"]
        assert send.call("connect", peer_id="bench-decode", info=info)["ok"]
        for n in block_counts:
            times = []
            for i, meta in enumerate(_metas(spec, n, f"{transport}-{n}", repeats)):
                recv.request("recv", ticket=KVTicket(transport, "bench-prefill", "bench-decode", meta),
                             timeout_s=timeout_s)
                send.request("send", peer_id="bench-decode", meta=meta, timeout_s=timeout_s)
                sent, got = send.reply(timeout_s + 30), recv.reply(timeout_s + 30)
                if not (sent["ok"] and got["ok"]):
                    raise RuntimeError(f"{transport} transfer failed: {sent.get('error') or got.get('error')}")
                if i:  # the first one is the warm-up (and builds the communicator)
                    times.append(sent["elapsed_s"])
            rows.append(_row(n, times))
    return rows


def gloo_gbps(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    return rendezvous_gbps("gloo", *args, **kwargs)


def shm_gbps(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    return rendezvous_gbps("shm", *args, **kwargs)


class TimedKVEndpoint(KVEndpoint):
    """A ``KVEndpoint`` actor that times its own send / recv and pins itself."""

    def pin(self, cores: list[int]) -> None:
        pin_self(cores)
        torch.set_num_threads(len(cores))

    def timed_send(self, peer_id: str, meta) -> tuple[Any, float]:
        start = time.perf_counter()
        result = self.send(peer_id, meta)
        return result.ticket, time.perf_counter() - start

    def timed_recv(self, ticket) -> float:
        start = time.perf_counter()
        self.recv(ticket)
        return time.perf_counter() - start


def ray_gbps(block_counts: list[int], repeats: int, send_cores: list[int], recv_cores: list[int],
             timeout_s: float = 120.0) -> list[dict[str, Any]]:
    import ray

    spec = replace(CACHE, num_blocks=max(block_counts))
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    Endpoint = ray.remote(num_cpus=0)(TimedKVEndpoint)
    sender = Endpoint.remote("sender", "ray", "bench-prefill", asdict(spec), timeout_s=timeout_s)
    receiver = Endpoint.remote("receiver", "ray", "bench-decode", asdict(replace(spec, seed=1)), timeout_s=timeout_s)
    try:
        ray.get([sender.pin.remote(send_cores), receiver.pin.remote(recv_cores)], timeout=timeout_s)
        info = ray.get(receiver.pair_info.remote("bench-prefill"))
        ray.get(sender.connect.remote("bench-decode", info), timeout=timeout_s)
        rows = []
        for n in block_counts:
            times = []
            for i, meta in enumerate(_metas(spec, n, f"ray-{n}", repeats)):
                ticket, send_s = ray.get(sender.timed_send.remote("bench-decode", meta), timeout=timeout_s)
                recv_s = ray.get(receiver.timed_recv.remote(ticket), timeout=timeout_s)
                if i:
                    times.append(send_s + recv_s)
            rows.append(_row(n, times))
        return rows
    finally:
        for actor in (sender, receiver):
            ray.kill(actor)
        if owns_ray:
            ray.shutdown()


def _row(num_blocks: int, times: list[float]) -> dict[str, Any]:
    seconds = statistics.median(times)
    num_bytes = num_blocks * BLOCK_BYTES
    return {"blocks": num_blocks, "bytes": num_bytes, "seconds": seconds, "gbps": num_bytes / seconds / 1e9,
            "repeats": len(times)}


TRANSPORTS = {"gloo": gloo_gbps, "shm": shm_gbps, "ray": ray_gbps}


def head_of_line(transport: str, lanes: int, long_blocks: int, repeats: int, send_cores: list[int],
                 recv_cores: list[int], timeout_s: float = 120.0) -> dict[str, Any]:
    """A one-block transfer (a short chat's KV) alone, then started while a ``long_blocks``
    transfer (a long document's) runs on the same pair, from the same sender to the same
    receiver; the sender may open ``lanes`` communicators to it. Medians of ``repeats`` (after a
    warm-up round, which also builds the lanes), seconds as the sender's ``send`` saw them."""
    spec = replace(CACHE, num_blocks=long_blocks + 1)
    long_ids, short_ids = list(range(long_blocks)), [long_blocks]
    sender_id, receiver_id = "bench-prefill", "bench-decode"

    def meta(tag: str, i: int, ids: list[int]):
        return make_meta(spec, f"{tag}-{i}", ids, ids, num_tokens=len(ids) * spec.block_size)

    def recv_op(m):
        return {"op": "recv", "ticket": _ticket_wire(KVTicket(transport, sender_id, receiver_id, m)),
                "timeout_s": timeout_s}

    def send_op(m, delay_s=0.0):
        return {"op": "send", "peer_id": receiver_id, "meta": m.to_msgpack(), "timeout_s": timeout_s,
                "delay_s": delay_s}

    with EndpointProcess("receiver", transport, receiver_id, replace(spec, seed=1), timeout_s=timeout_s,
                         torch_threads=len(recv_cores)) as recv, \
            EndpointProcess("sender", transport, sender_id, spec, timeout_s=timeout_s, max_lanes=lanes,
                            torch_threads=len(send_cores)) as send:
        pin_process(recv.process.pid, recv_cores)
        pin_process(send.process.pid, send_cores)
        assert send.call("connect", peer_id=receiver_id, info=recv.call("info", sender_id=sender_id)["info"])["ok"]

        def together(ops_recv, ops_send) -> list[float]:
            recv.request("together", ops=ops_recv)
            send.request("together", ops=ops_send)
            sent, got = send.reply(timeout_s + 30), recv.reply(timeout_s + 30)
            if not (sent["ok"] and got["ok"]):
                raise RuntimeError(f"{transport} transfer failed: {sent} {got}")
            return [r["elapsed_s"] for r in sent["replies"]]

        alone, long_alone, during = [], [], []
        for i in range(repeats + 1):
            (t,) = together([recv_op(meta("short", i, short_ids))], [send_op(meta("short", i, short_ids))])
            (t_long,) = together([recv_op(meta("long", i, long_ids))], [send_op(meta("long", i, long_ids))])
            delay = t_long / 4  # the short one starts a quarter into the long one
            t_pair = together([recv_op(meta("long-b", i, long_ids)), recv_op(meta("short-b", i, short_ids))],
                              [send_op(meta("long-b", i, long_ids)), send_op(meta("short-b", i, short_ids), delay)])
            if i:
                alone.append(t)
                long_alone.append(t_long)
                during.append(t_pair[1])
    med = statistics.median
    return {"transport": transport, "lanes": lanes, "long_bytes": long_blocks * BLOCK_BYTES,
            "short_bytes": BLOCK_BYTES, "short_alone_s": med(alone), "short_during_long_s": med(during),
            "long_alone_s": med(long_alone), "ratio": med(during) / med(alone), "repeats": repeats}
