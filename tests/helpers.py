"""Helpers shared by the end-to-end test modules (a served cluster driven over gRPC and HTTP):
the colocated reference engine, waiting for a cluster to be idle, worker counters, OpenAI errors."""

from __future__ import annotations

import base64
import json
import time

import httpx

from tests.conftest import TEST_ENGINE

_engines: dict = {}


def reference_engine(arch, path):
    """The colocated reference of ``arch``, with the test clusters' engine settings (one at a time)."""
    from cluster.config import EngineConfig
    from cluster.engine.colocated import ColocatedEngine

    if arch not in _engines:
        _engines.clear()
        _engines[arch] = ColocatedEngine(EngineConfig(model=str(path), **TEST_ENGINE))
    return _engines[arch]


def reference(engine, requests):
    """[(prompt, media, sampling)] -> Completions, all in one continuous batch."""
    return engine.generate(list(requests))


def wait_until_idle(stack, timeout_s: float = 20.0) -> dict:
    """Until the router holds nothing and every KV block of every LM worker is free; the status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = stack.client.status()
        lm_workers = [w for name in ("prefill", "decode") for w in status["pools"][name]["workers"]]
        if stack.core.is_idle and all(w["num_kv_blocks_free"] == w["num_kv_blocks_total"] > 0 for w in lm_workers):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"cluster not idle after {timeout_s} s: {json.dumps(status)}")
        time.sleep(0.1)


def worker_loads(stack) -> dict[str, dict]:
    import ray

    return {w.worker_id: ray.get(w.actor.load.remote(), timeout=30) for w in stack.cluster.controller.workers()}


# What a request that reaches a worker moves: encoder cache lookups, prefills, decode reservations.
WORKER_COUNTERS = ("cache_hits", "cache_misses", "num_prefilled", "num_reserved", "num_finished", "kv_blocks_free")


def worker_counters(stack) -> dict[str, dict]:
    """{worker id: {counter: value}} of ``WORKER_COUNTERS`` (None where a role has no such counter)."""
    return {wid: {k: load.get(k) for k in WORKER_COUNTERS} for wid, load in worker_loads(stack).items()}


def data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(png).decode()


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and isinstance(body["error"]["type"], str)
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# -- requests held long, waits with a deadline, leak checks (cancellation and overload tests) ----
def long_request(request_id: str = "", max_tokens: int = 1000):
    """A one-image request that decodes ``max_tokens`` tokens (ignores EOS): one that is still
    running when a test stops it."""
    from cluster.client import build_request
    from cluster.request_types import SamplingParams
    from models.media_samples import make_test_image
    from cluster.request_types import MediaInput

    return build_request("USER: <image>\nTell me a long story. ASSISTANT:",
                         [MediaInput(make_test_image(5), "image/png")],
                         SamplingParams(max_tokens=max_tokens, ignore_eos=True), request_id=request_id)


def decode_finished(stack) -> int:
    """Requests the decode workers ran to their end (an aborted one does not count)."""
    return sum(load.get("num_finished", 0) for wid, load in worker_loads(stack).items() if wid.startswith("decode"))


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll ``predicate()`` until it returns something truthy, and return that; after
    ``timeout_s`` fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what} (last: {value!r})")
        time.sleep(poll_s)


def cluster_leaks(stack) -> list[str]:
    """What the cluster still holds, one line per place; empty when nothing: the router's requests
    and cleanups, its admission counters and per-worker accounting; every LM worker's KV blocks;
    the decode reservations and running requests, the prefill queue and KV sends, the encoder's
    queued and encoding items (``controller.BUSY_KEYS``)."""
    import ray

    from cluster.controller import BUSY_KEYS, WorkerState

    async def router_side() -> list[str]:  # read on the router's loop: no race with its tasks
        core, out = stack.core, []
        if not core.is_idle:
            out.append(f"router: not idle ({core.num_running} requests running, or a cleanup still letting go)")
        if core.admission.num_inflight or core.admission.num_queued:
            out.append(f"router admission: {core.admission.num_inflight} in flight, {core.admission.num_queued} queued")
        for w in core.controller.workers():
            held = {k: getattr(w, k) for k in ("inflight_requests", "inflight_tokens", "reserved_blocks")}
            if any(held.values()):
                out.append(f"router accounting of {w.worker_id}: {held}")
        return out

    leaks = stack.router.run(router_side(), timeout_s=30)
    for w in stack.cluster.controller.workers():
        if w.state not in (WorkerState.READY, WorkerState.DRAINING):
            continue
        load = ray.get(w.actor.load.remote(), timeout=30)
        held = {k: load.get(k) for k in BUSY_KEYS.get(w.pool, ()) if load.get(k)}
        if w.pool in ("prefill", "decode") and load["kv_blocks_free"] != load["kv_blocks_total"]:
            held["kv_blocks_used"] = load["kv_blocks_total"] - load["kv_blocks_free"]
        if held:
            leaks.append(f"{w.worker_id}: {held}")
    return leaks


def wait_until_clean(stack, timeout_s: float = 30.0) -> None:
    """Until ``cluster_leaks`` finds nothing: every stage let go of every request."""
    leaks: list[str] = []

    def clean() -> bool:
        leaks[:] = cluster_leaks(stack)
        return not leaks

    try:
        wait_for(clean, timeout_s, "the cluster holds nothing", poll_s=0.1)
    except AssertionError:
        raise AssertionError(f"still held after {timeout_s} s: {leaks}") from None


# -- a worker's token stream, read by hand (the router's own client) -------------------------------
class CollectingSink:
    """A request's deltas off its worker's token stream; ``done`` resolves with the finish reason."""

    def __init__(self):
        import asyncio

        self.deltas: list[tuple[list[int], str | None]] = []
        self.first = asyncio.get_running_loop().create_future()  # resolves at the first delta
        self.done = asyncio.get_running_loop().create_future()

    @property
    def token_ids(self) -> list[int]:
        return [t for tokens, _ in self.deltas for t in tokens]

    def push(self, token_ids, finish_reason, logprobs=None) -> None:
        assert not self.done.done(), "nothing may follow a request's finish"
        self.deltas.append((list(token_ids), finish_reason))
        if not self.first.done():
            self.first.set_result(None)
        if finish_reason is not None:
            self.done.set_result(finish_reason)

    def fail(self, error) -> None:
        if not self.done.done():
            self.done.set_exception(error)


async def open_token_stream(actor, worker_id: str):
    """``router.token_streams.TokenStreams`` with a stream open to ``actor``; close it when done."""
    from types import SimpleNamespace

    from router.token_streams import TokenStreams

    streams = TokenStreams()
    await streams.ensure(SimpleNamespace(worker_id=worker_id, actor=actor))
    return streams
