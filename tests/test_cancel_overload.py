"""Cancellation, deadlines and overload on a real local cluster (CPU, tiny LLaVA, KV over gloo),
driven through gRPC (and HTTP for the 429):

* a request stopped at each stage (queued for admission, encoding, prefilling, shipping its KV,
  decoding) by a client cancel, an Abort or a deadline leaves nothing held anywhere;
* 1,000 requests stopped at random moments leak nothing, and the output afterwards is
  token-exact to the same request before them;
* a decode worker out of KV blocks queues requests (bounded, without spinning) instead of failing
  them and, beyond the bound, rejects fast with RESOURCE_EXHAUSTED; so does admission (HTTP 429);
* a burst of multimodal requests does not make the health checks kill healthy workers.

A stage is held with a fault point of ``cluster.faults`` (a stalled encode, forward or KV send)
while the test stops the request; every wait polls with a deadline (``tests.helpers.wait_for``).
Two clusters, one at a time (``served_cluster``): a small-KV one for the exhaustion tests first,
then the main one. The first two tests need no cluster: the health probe and the encoder queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import ray

from cluster.api import tessera_pb2 as pb
from cluster.client import FINISH_REASONS, TesseraClient, build_request
from cluster.contracts import EncodeItem
from cluster.controller import WorkerState
from cluster.request_types import MediaInput, SamplingParams
from models.media_samples import make_test_image
from tests.helpers import decode_finished, long_request, wait_for, wait_until_clean

ARCH = "llava-clip-llama"
TEXT_PROMPT = "Once upon a time, in a city by the sea,"
IMAGE_PROMPT = "USER: <image>\nWhat is in this picture? ASSISTANT:"
TWO_IMAGE_PROMPT = "<image> and <image>: compare the two."
STALL_S = 2.0  # how long a stalled stage holds a request: under the health timeout (a stall is no wedge)
HEALTH = {"health_check_period_s": 0.5, "health_check_timeout_s": 3.0, "health_check_failures": 3}
KV_BLOCKS = 48  # the small cluster's KV cache (prefill and decode), blocks of 16 tokens: two one-image requests
MAX_WAITING = 4  # its router.max_queued_requests: requests waiting for KV blocks (and for admission)
SAFETY_S = 120.0  # the deadline of every other stream: a bug ends the test, it does not hang it
_image_seeds = itertools.count(10_000)


def fresh_image() -> MediaInput:
    """An image no test sent before (a new content hash: the encoder must encode it)."""
    return MediaInput(make_test_image(next(_image_seeds)), "image/png")


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def only(stack, pool: str):
    [worker] = [w for w in stack.cluster.controller.workers(pool) if w.state is WorkerState.READY]
    return worker


def load(worker) -> dict:
    return ray.get(worker.actor.load.remote(), timeout=30)


def on_router(stack, fn):
    """``fn()`` on the router's event loop (reads of its state race nothing there)."""
    async def call():
        return fn()

    return stack.router.run(call(), timeout_s=30)


@contextlib.contextmanager
def armed(worker, point: str, seconds: float = STALL_S):
    """``point`` of ``worker`` stalls its next pass for ``seconds``; disarmed on the way out."""
    ray.get(worker.actor.inject_fault.remote(point, "stall", seconds=seconds), timeout=30)
    try:
        yield
    finally:
        ray.get(worker.actor.clear_faults.remote(), timeout=30)


# -- no cluster: the health probe and the encoder queue ---------------------------------------
def test_health_probe_judges_a_busy_model_thread_by_the_age_of_its_step():
    """A probe is not queued behind a running step (it would wait the step out and time out on a
    healthy worker under a burst of long steps): a young step passes at once, one running longer
    than the timeout (a wedged forward) fails, an idle thread runs the device op."""
    from cluster.worker_base import BaseWorker

    class Worker(BaseWorker):
        pool = "prefill"

        async def _engine_loop(self):
            await asyncio.Event().wait()

        def _load(self):
            return {}

    async def main():
        worker = Worker("prefill-9")
        worker._ensure_loop()
        release = threading.Event()
        step = asyncio.ensure_future(worker.run_blocking(release.wait, 60))  # one long step, until released
        await asyncio.sleep(0.05)
        assert (await worker.health_probe(0.5))["healthy"] is True
        assert not step.done()  # answered while the step runs, not after it
        await asyncio.sleep(0.6)  # the step has now run for more than 0.5 s
        with pytest.raises(RuntimeError, match="one model step has run"):
            await worker.health_probe(0.5)
        release.set()
        await step
        assert (await worker.health_probe(0.5))["healthy"] is True  # idle again: the device op answers
        await worker.shutdown()

    asyncio.run(main())


def test_encoder_drops_queued_media_that_nobody_waits_for(tiny_models):
    """A cancelled ``encode`` call's queued items are dropped unless another call shares them; the
    batch already in the forward completes. Without this, cancelled requests' media piled up in
    the encoder queue beyond what the router admits."""
    import torch

    from cluster.config import EngineConfig
    from encoder_pool.worker import EncoderWorker

    threads = torch.get_num_threads()
    worker = EncoderWorker(EngineConfig(model=str(tiny_models[ARCH])), "encoder-9", batch_wait_ms=0)
    torch.set_num_threads(threads)  # (the worker set this process's torch threads to 1)
    items = [EncodeItem(f"hash-{i}", "image/png", make_test_image(40 + i)) for i in range(3)]

    async def until(predicate, what: str):
        deadline = time.monotonic() + 10
        while not predicate(await worker.load()):
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)

    async def main():
        worker._ensure_loop()
        worker.faults.arm("encode", "stall", seconds=1.0)
        first = asyncio.ensure_future(worker.encode([items[0]]))
        await until(lambda s: s["num_encoding_items"] == 1, "item 0 in the stalled forward")
        both = asyncio.ensure_future(worker.encode([items[1], items[2]]))
        shares = asyncio.ensure_future(worker.encode([items[1]]))  # coalesced with `both` on item 1
        await until(lambda s: s["num_queued_items"] == 2 and s["num_coalesced_items"] == 1, "items 1, 2 queued")
        both.cancel()  # item 2: nobody else waits for it; item 1: `shares` does
        await until(lambda s: (s["num_queued_items"], s["num_dropped_items"]) == (1, 1), "item 2 dropped")
        shares.cancel()
        await until(lambda s: (s["num_queued_items"], s["num_dropped_items"]) == (0, 2), "item 1 dropped")
        [emb] = await first  # the forward that was running completes
        assert emb.ndim == 2 and (await worker.load())["num_encoded_items"] == 1
        [again] = await worker.encode([items[2]])  # a dropped item encodes when asked again
        assert again.shape == emb.shape and (await worker.load())["num_encoded_items"] == 2
        await worker.shutdown()

    asyncio.run(main())


# -- clusters ------------------------------------------------------------------------------
def small_kv_overrides(model_path) -> dict:
    """A KV cache of ``KV_BLOCKS`` blocks (the size is given in GiB: sized from the model's KV
    bytes per block, fp32) and a wait queue of ``MAX_WAITING`` requests."""
    text = json.loads((Path(model_path) / "config.json").read_text())["text_config"]
    bytes_per_block = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * text["head_dim"] * 16 * 4
    return {"engine": {"kv_cache_memory_gb": KV_BLOCKS * bytes_per_block / 2**30},
            "router": {"max_queued_requests": MAX_WAITING}}


@pytest.fixture
def small_kv(served_cluster, tiny_models):
    stack = served_cluster(ARCH, **small_kv_overrides(tiny_models[ARCH]))
    assert load(only(stack, "decode"))["kv_blocks_total"] == KV_BLOCKS
    return stack


def check_request(stack):
    """The request run before and after the cancellation storm (greedy: must come out the same)."""
    images = [MediaInput(make_test_image(1), "image/png"), MediaInput(make_test_image(2), "image/png")]
    return stack.client.generate(TWO_IMAGE_PROMPT, images, SamplingParams(max_tokens=24))


@pytest.fixture(scope="module")
def baseline(served_cluster):
    """The check request on the main cluster before any test here stopped a request on it."""
    return check_request(served_cluster(ARCH, controller=HEALTH))


@pytest.fixture
def stack(served_cluster, baseline):
    return served_cluster(ARCH, controller=HEALTH)


# -- KV exhaustion on decode (small cluster) ------------------------------------------------
class ReserveCounter:
    """Stands in for a decode worker's actor handle in the router's records: counts ``reserve``
    calls per request id; everything else passes through."""

    def __init__(self, actor):
        self.actor = actor
        self._calls: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def calls(self) -> collections.Counter:
        with self._lock:
            return collections.Counter(self._calls)

    def __getattr__(self, name: str):
        method = getattr(self.actor, name)
        if name != "reserve":
            return method
        counter = self

        class Counted:
            def remote(self, request_id, *args):
                with counter._lock:
                    counter._calls[request_id] += 1
                return method.remote(request_id, *args)

        return Counted()


@contextlib.contextmanager
def counting_reserves(worker):
    counter = ReserveCounter(worker.actor)
    worker.actor = counter
    try:
        yield counter
    finally:
        worker.actor = counter.actor


def kv_requests(n: int, first_image: int) -> list[tuple[str, list[MediaInput], SamplingParams]]:
    """One-image requests of 18 blocks each (266 prompt tokens + 12): two fit in ``KV_BLOCKS``."""
    return [(IMAGE_PROMPT, [MediaInput(make_test_image(first_image + i), "image/png")], greedy(12))
            for i in range(n)]


@pytest.mark.slow
def test_more_requests_than_decode_kv_blocks_wait_and_all_complete_exactly(small_kv):
    requests = kv_requests(2 + MAX_WAITING, first_image=300)  # two hold the blocks, the rest wait
    expected = [small_kv.client.generate(*r).token_ids for r in requests]  # one at a time
    barrier = threading.Barrier(len(requests))

    def run(req):
        barrier.wait()
        return small_kv.client.generate(*req, timeout_s=120)

    with counting_reserves(only(small_kv, "decode")) as reserves:
        with ThreadPoolExecutor(len(requests)) as pool:
            got = list(pool.map(run, requests))
    assert [g.token_ids for g in got] == expected
    assert {g.finish_reason for g in got} == {"length"}
    assert sum(reserves.calls().values()) > len(requests)  # decode was full: some requests waited
    wait_until_clean(small_kv)


@pytest.mark.slow
def test_beyond_the_kv_wait_queue_requests_are_rejected_fast_and_waiting_does_not_spin(small_kv):
    requests = kv_requests(MAX_WAITING, first_image=320)
    expected = [small_kv.client.generate(*r).token_ids for r in requests]
    decode = only(small_kv, "decode")
    # every block, outside the router (prompt + max_tokens is capped at the context: all KV_BLOCKS)
    ray.get(decode.actor.reserve.remote("hog", 100, 10_000), timeout=30)
    try:
        with counting_reserves(decode) as reserves, ThreadPoolExecutor(MAX_WAITING) as pool:
            ids = [f"waiter-{i}" for i in range(MAX_WAITING)]
            waiting = [pool.submit(small_kv.client.generate, *r, request_id=rid, timeout_s=120)
                       for r, rid in zip(requests, ids)]
            # each waiter was refused once and tried again: it is counted in the router's wait queue
            wait_for(lambda: all(reserves.calls()[rid] >= 2 for rid in ids), 10, "every request waiting for blocks")

            # waiting re-polls (every 0.2 s, or when a request ends): no hot loop of reserve calls
            before, start = sum(reserves.calls().values()), time.monotonic()
            time.sleep(2.0)
            rate = (sum(reserves.calls().values()) - before) / (time.monotonic() - start) / MAX_WAITING
            assert rate < 15, f"{rate:.1f} reserve calls per second per waiting request"

            latencies = []
            for req in [(TEXT_PROMPT, [], greedy(4)), (IMAGE_PROMPT, [fresh_image()], greedy(4))] * 2:
                start = time.perf_counter()
                with pytest.raises(grpc.RpcError) as err:
                    small_kv.client.generate(*req, timeout_s=30)
                latencies.append(time.perf_counter() - start)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert max(latencies) < 1.0, latencies
            print(f"\nKV wait queue full: RESOURCE_EXHAUSTED in {1000 * max(latencies):.0f} ms at most "
                  f"(median {1000 * sorted(latencies)[len(latencies) // 2]:.0f} ms); {rate:.1f} reserve "
                  f"calls/s per waiting request")

            assert not any(f.done() for f in waiting)
            ray.get(decode.actor.abort.remote("hog"), timeout=30)
            got = [f.result(timeout=120) for f in waiting]
    finally:
        ray.get(decode.actor.abort.remote("hog"), timeout=30)
    assert [g.token_ids for g in got] == expected
    wait_until_clean(small_kv)


# -- a stop at each stage (main cluster) ----------------------------------------------------
STOPS = ("cancel", "abort", "deadline")
OUTCOME = {"cancel": "CANCELLED", "abort": "abort", "deadline": "DEADLINE_EXCEEDED"}


def start(stack, request: pb.GenerateRequest, how: str, deadline_s: float):
    """The request's response stream; for ``how == "deadline"`` with a gRPC deadline of ``deadline_s``."""
    return stack.client.stream(request, timeout_s=deadline_s if how == "deadline" else SAFETY_S)


def read_rest(call) -> tuple[str, int]:
    """Read a response stream to its end: (the finish reason or the gRPC status name, tokens)."""
    num_tokens = 0
    try:
        for resp in call:
            if resp.HasField("final"):
                return FINISH_REASONS[resp.final.finish_reason], num_tokens
            num_tokens += len(resp.chunk.token_ids)
    except grpc.RpcError as err:
        return err.code().name, num_tokens
    return "no final message", num_tokens


def stop(stack, call, request_id: str, how: str) -> tuple[str, int]:
    """Stop the request ``how`` (a deadline: wait for it) and read the rest (``read_rest``)."""
    if how == "cancel":
        call.cancel()
    elif how == "abort":
        assert stack.client.abort(request_id) is True
    return read_rest(call)


@pytest.mark.slow
@pytest.mark.parametrize("how", STOPS)
def test_stop_while_queued_for_admission(stack, how):
    admission = stack.core.admission
    limits = admission.max_inflight, admission.max_queued
    prefill = only(stack, "prefill")
    admission.max_inflight, admission.max_queued = 1, 4
    holder = stack.client.stream(long_request(max_tokens=500), timeout_s=SAFETY_S)
    try:
        next(holder)  # the one slot is taken
        num_prefilled = load(prefill)["num_prefilled"]
        rid = f"queued-{how}"
        call = start(stack, build_request(TEXT_PROMPT, sampling=greedy(8), request_id=rid), how, 1.0)
        wait_for(lambda: on_router(stack, lambda: admission.num_queued) == 1, 5, "the request queued")
        assert stop(stack, call, rid, how) == (OUTCOME[how], 0)
        wait_for(lambda: on_router(stack, lambda: admission.num_queued) == 0, 5, "its queue place given back")
        assert load(prefill)["num_prefilled"] == num_prefilled  # it never reached a worker
    finally:
        holder.cancel()
        admission.max_inflight, admission.max_queued = limits
    wait_until_clean(stack)


@pytest.mark.slow
@pytest.mark.parametrize("how", STOPS)
def test_stop_while_encoding(stack, how):
    """One request's image in a stalled encoder forward, a second one's queued behind it: both
    stopped; the queued image is dropped, the other completes (and is cached); nothing prefilled."""
    encoder, prefill = only(stack, "encoder"), only(stack, "prefill")
    before, num_prefilled = load(encoder), load(prefill)["num_prefilled"]
    calls = []
    with armed(encoder, "encode"):
        for i, where in enumerate(("num_encoding_items", "num_queued_items")):
            rid = f"encoding-{how}-{i}"
            calls.append((rid, start(stack, build_request(IMAGE_PROMPT, [fresh_image()], greedy(8), request_id=rid),
                                     how, 1.0)))
            wait_for(lambda: load(encoder)[where] >= 1, STALL_S, f"request {i}'s image at {where}")
        for rid, call in calls:
            assert stop(stack, call, rid, how) == (OUTCOME[how], 0)
    wait_until_clean(stack)
    after = load(encoder)
    assert after["num_dropped_items"] == before["num_dropped_items"] + 1
    assert after["num_encoded_items"] == before["num_encoded_items"] + 1
    assert load(prefill)["num_prefilled"] == num_prefilled


@pytest.mark.slow
@pytest.mark.parametrize("how", STOPS)
def test_stop_while_prefilling(stack, how):
    prefill = only(stack, "prefill")
    num_finished = decode_finished(stack)
    with armed(prefill, "forward"):
        rid = f"prefill-{how}"
        call = start(stack, build_request(f"{TEXT_PROMPT} ({rid})", sampling=greedy(8), request_id=rid), how, 1.0)
        wait_for(lambda: load(prefill)["num_queued_requests"] >= 1, STALL_S, "the prompt in the stalled forward")
        assert stop(stack, call, rid, how) == (OUTCOME[how], 0)
    wait_until_clean(stack)  # (the prefill blocks are freed once the stalled step ends)
    assert decode_finished(stack) == num_finished


@pytest.mark.slow
@pytest.mark.parametrize("how", STOPS)
def test_stop_while_the_kv_ships_lets_the_transfer_end_first(stack, how):
    """After the first token the KV transfer cannot be called back: the cleanup waits for the
    (stalled) transfer to land, then frees the decode reservation."""
    prefill, decode = only(stack, "prefill"), only(stack, "decode")
    num_ok, num_failed = load(decode)["kv_transfers_ok"], load(prefill)["kv_transfers_failed"]
    num_finished = decode_finished(stack)
    with armed(prefill, "kv_send"):
        rid = f"kv-{how}"
        call = start(stack, build_request(f"{TEXT_PROMPT} ({rid})", sampling=greedy(50), request_id=rid), how, 1.0)
        assert len(next(call).chunk.token_ids) == 1  # the first token, before the KV
        stalled_at = wait_for(lambda: load(prefill)["num_shipping"] >= 1 and time.monotonic(), STALL_S,
                              "the KV transfer stalled")
        assert stop(stack, call, rid, how) == (OUTCOME[how], 0)
        if time.monotonic() < stalled_at + STALL_S - 0.5:  # still stalled: the reservation is held
            assert load(decode)["num_reserved"] == 1
            assert not on_router(stack, lambda: stack.core.is_idle)
    wait_until_clean(stack)
    assert load(decode)["kv_transfers_ok"] == num_ok + 1  # it landed (and was then let go)
    assert load(prefill)["kv_transfers_failed"] == num_failed
    assert decode_finished(stack) == num_finished


@pytest.mark.slow
@pytest.mark.parametrize("how", STOPS)
def test_stop_while_decoding(stack, how):
    decode = only(stack, "decode")
    num_finished = decode_finished(stack)
    rid = f"decode-{how}"
    call = start(stack, long_request(rid, max_tokens=1000), how, 1.5)
    for _ in range(3):
        assert next(call).chunk.token_ids
    wait_for(lambda: load(decode)["num_running"] >= 1, 5, "the request in the decode batch")
    assert stop(stack, call, rid, how)[0] == OUTCOME[how]
    wait_until_clean(stack)
    assert decode_finished(stack) == num_finished  # aborted, not run to max_tokens


# -- overload --------------------------------------------------------------------------------
@pytest.mark.slow
def test_admission_overload_is_rejected_fast_over_grpc_and_http(stack):
    admission = stack.core.admission
    limits = admission.max_inflight, admission.max_queued
    admission.max_inflight, admission.max_queued = 2, 2
    holders, queued = [], []
    try:
        for _ in range(2):
            holders.append(stack.client.stream(long_request(max_tokens=400), timeout_s=SAFETY_S))
            next(holders[-1])
        queued = [stack.client.stream(build_request(f"{TEXT_PROMPT} {i}", sampling=greedy(4)), timeout_s=SAFETY_S)
                  for i in range(2)]
        wait_for(lambda: on_router(stack, lambda: admission.num_queued) == 2, 5, "two requests queued")
        latencies = []
        for i in range(5):
            start_s = time.perf_counter()
            with pytest.raises(grpc.RpcError) as err:
                stack.client.generate(f"{TEXT_PROMPT} {i}", sampling=greedy(4), timeout_s=30)
            latencies.append(time.perf_counter() - start_s)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        body = {"model": httpx.get(f"{stack.http_url}/v1/models", timeout=30).json()["data"][0]["id"],
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        start_s = time.perf_counter()
        resp = httpx.post(f"{stack.http_url}/v1/chat/completions", json=body, timeout=30)
        latencies.append(time.perf_counter() - start_s)
        assert resp.status_code == 429, resp.text
        assert max(latencies) < 1.0, latencies
        print(f"\nadmission full: rejected in {1000 * max(latencies):.0f} ms at most")
    finally:
        for call in holders:
            call.cancel()
        admission.max_inflight, admission.max_queued = limits
    for call in queued:  # admitted once the holders let go
        assert read_rest(call) == ("length", 4)
    wait_until_clean(stack)


@pytest.mark.slow
def test_a_burst_does_not_make_the_health_checks_kill_healthy_workers(stack):
    """64 concurrent two-image requests with new images (every image encoded, long prefill steps)
    while every worker is probed each 0.5 s with a 3 s timeout: no worker is replaced and every
    request succeeds. The workers' queues stay within what the router admitted."""
    controller = stack.cluster.controller
    members = sorted((w.worker_id, w.state) for w in controller.workers())
    assert {state for _, state in members} == {WorkerState.READY}
    num_events = len(controller.history)
    seen = collections.Counter()  # the most seen of each: health failures, queued encoder items, prefills
    stop_watch = threading.Event()

    def watch():
        while not stop_watch.wait(0.05):
            for w in controller.workers():
                seen["health_failures"] = max(seen["health_failures"], w.health_failures)
                items = w.load.get("num_queued_items", 0) + w.load.get("num_encoding_items", 0)
                seen["encoder_items"] = max(seen["encoder_items"], items)
                seen["prefill_queued"] = max(seen["prefill_queued"], w.load.get("num_queued_requests", 0))

    requests = [(TWO_IMAGE_PROMPT, [fresh_image(), fresh_image()], greedy(16)) for _ in range(64)]
    barrier = threading.Barrier(len(requests))

    def run(req):
        barrier.wait()
        return stack.client.generate(*req, timeout_s=300)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        start_s = time.perf_counter()
        with ThreadPoolExecutor(len(requests)) as pool:
            got = list(pool.map(run, requests))
        seconds = time.perf_counter() - start_s
    finally:
        stop_watch.set()
        watcher.join()
    print(f"\nburst of {len(requests)} two-image requests in {seconds:.1f} s; most seen: {dict(seen)}")
    assert all(g.finish_reason == "length" and len(g.token_ids) == 16 for g in got)
    assert sorted((w.worker_id, w.state) for w in controller.workers()) == members  # none dead or replaced
    assert not [e for e in list(controller.history)[num_events:] if e["event"] == "ready"]  # none restarted
    assert seen["health_failures"] < HEALTH["health_check_failures"]
    assert seen["encoder_items"] <= 2 * len(requests) and seen["prefill_queued"] <= len(requests)
    wait_until_clean(stack)


# -- 1,000 random cancellations -------------------------------------------------------------
NUM_STORM = 1000
STORM_CONCURRENCY = 48
STORM_SEED = 6
STORM_MODES = {"cancel_at_once": 15, "cancel_after_chunks": 25, "cancel_after_sleep": 20, "abort": 15,
               "deadline": 15, "none": 10}  # how a request is stopped: relative weights
STORM_OUTCOMES = {"CANCELLED", "DEADLINE_EXCEEDED", "abort", "length", "stop"}


@dataclass
class StormRequest:
    request: pb.GenerateRequest
    mode: str  # a key of STORM_MODES
    num_chunks: int  # cancel_after_chunks: responses read first
    delay_s: float  # cancel_after_sleep / abort: wait before stopping; deadline: the gRPC deadline


def storm_requests(rng: random.Random) -> list[StormRequest]:
    """Text, one image, two images; images from a small set (encoder-cache hits) or new ones
    (encoded: some are stopped mid-encode); 1-6 tokens, so that the storm stays cheap."""
    pool = [MediaInput(make_test_image(60 + i), "image/png") for i in range(8)]
    out = []
    for i in range(NUM_STORM):
        num_images = rng.choices((0, 1, 2), weights=(40, 35, 25))[0]
        media = [fresh_image() if rng.random() < 0.2 else rng.choice(pool) for _ in range(num_images)]
        prompt = (TEXT_PROMPT, IMAGE_PROMPT, TWO_IMAGE_PROMPT)[num_images]
        sampling = SamplingParams(max_tokens=rng.randint(1, 6), ignore_eos=rng.random() < 0.5)
        mode = rng.choices(list(STORM_MODES), weights=list(STORM_MODES.values()))[0]
        delay = rng.uniform(0.005, 0.4) if mode == "deadline" else rng.uniform(0.0, 0.25)
        out.append(StormRequest(build_request(prompt, media, sampling, request_id=f"storm-{i}"), mode,
                                rng.randint(0, 4), delay))
    return out


def run_storm(address: str, requests: list[StormRequest]) -> list[str]:
    """Every request from ``STORM_CONCURRENCY`` client threads; each one's outcome (a gRPC status
    name or a finish reason)."""
    with TesseraClient(address) as client, ThreadPoolExecutor(STORM_CONCURRENCY) as pool:
        return list(pool.map(lambda req: run_one(client, req), requests))


def run_one(client: TesseraClient, req: StormRequest) -> str:
    call = client.stream(req.request, timeout_s=req.delay_s if req.mode == "deadline" else SAFETY_S)
    try:
        if req.mode == "cancel_at_once":  # (the request is on its way, maybe not even sent)
            call.cancel()
        elif req.mode == "cancel_after_chunks":
            for _ in range(req.num_chunks):
                resp = next(call, None)
                if resp is None:
                    break
                if resp.HasField("final"):
                    return FINISH_REASONS[resp.final.finish_reason]
            call.cancel()
        elif req.mode == "cancel_after_sleep":
            time.sleep(req.delay_s)
            call.cancel()
        elif req.mode == "abort":
            time.sleep(req.delay_s)
            client.abort(req.request.request_id)  # (found or not: both fine)
    except grpc.RpcError as err:
        return err.code().name
    return read_rest(call)[0]


@pytest.mark.slow
def test_1000_random_cancellations_leak_nothing_and_change_no_output(stack, baseline):
    requests = storm_requests(random.Random(STORM_SEED))
    start_s = time.perf_counter()
    outcomes = run_storm(stack.address, requests)
    seconds = time.perf_counter() - start_s
    by_mode: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for req, outcome in zip(requests, outcomes):
        by_mode[req.mode][outcome] += 1
    print(f"\n{NUM_STORM} requests, {STORM_CONCURRENCY} at a time, in {seconds:.1f} s: "
          f"{ {mode: dict(c) for mode, c in sorted(by_mode.items())} }")
    counts = collections.Counter(outcomes)
    assert set(counts) <= STORM_OUTCOMES, counts  # nothing failed (UNAVAILABLE, INTERNAL, error, ...)
    assert counts["CANCELLED"] > 200 and counts["DEADLINE_EXCEEDED"] > 20 and counts["abort"] > 20, counts

    wait_until_clean(stack, timeout_s=60)  # 0 KV blocks, reservations, encoder items; the router idle
    encoder = load(only(stack, "encoder"))
    print(f"clean {time.perf_counter() - start_s - seconds:.1f} s after the last request; encoder: "
          f"{ {k: encoder[k] for k in ('num_encoded_items', 'num_dropped_items', 'cache_hits', 'cache_misses')} }")
    again = check_request(stack)
    assert (again.token_ids, again.text) == (baseline.token_ids, baseline.text)


@pytest.mark.slow
def test_an_abort_right_after_submit_still_ends_the_request(stack):
    """An Abort that the router handles before the request's driver task first ran (an Abort RPC
    arriving in the same event-loop turn as the end of ``submit``; the storm above hits this by
    chance) must still end the stream with "abort" and leave nothing behind (it once never ran
    the request's driver at all: no final event, no cleanup)."""
    from router.events import FinalEvent, GenerateInput

    rid = "abort-right-after-submit"

    async def submit_then_abort():
        stream = await stack.core.submit(GenerateInput(prompt=TEXT_PROMPT, sampling=greedy(4), request_id=rid))
        assert stack.core.abort(rid) is True  # the same loop turn: the driver task has not started
        async with asyncio.timeout(10):
            return [ev async for ev in stream]

    events = stack.router.run(submit_then_abort(), timeout_s=60)
    assert isinstance(events[-1], FinalEvent) and events[-1].finish_reason == "abort"
    wait_until_clean(stack)
