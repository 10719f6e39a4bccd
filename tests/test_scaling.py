"""Runtime scaling on a real local Ray cluster (CPU, tiny LLaVA, KV over gloo), driven through gRPC.

Under a continuous bounded stream of requests from client threads, decode and then encoder go
1 -> 2 -> 1 (ScaleCluster); every request must complete with output token-exact to the
colocated engine, and the new worker must have served some. Then a decode worker's process is
SIGKILLed: it must leave routing within a health period and the pool must be refilled to its
minimum. Then ScaleCluster with and without API keys.

This module has its own cluster (it changes membership); it is built once for the module.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
import pytest

from cluster.client import TesseraClient
from cluster.request_types import MediaInput, SamplingParams
from cluster.controller import WorkerState
from models.media_samples import make_test_image
from tests.conftest import TEST_ENGINE, ServedCluster
from tests.helpers import wait_for

pytestmark = pytest.mark.slow

ARCH = "llava-clip-llama"
HEALTH_PERIOD_S = 1.0
RAY_NOTICE_S = 1.5  # slack for Ray to report a killed process as dead


def request_variants() -> list[tuple[str, list[MediaInput], SamplingParams]]:
    """What the stream sends, round robin: six images (distinct content hashes, so the encoder's
    media-hash affinity spreads them over encoder workers) and two text-only prompts."""
    image_prompt = "USER: <image>\nWhat is in this picture? ASSISTANT:"
    variants = [(image_prompt, [MediaInput(make_test_image(20 + i), "image/png")],
                 SamplingParams(max_tokens=8 + 4 * (i % 2), ignore_eos=True)) for i in range(6)]
    variants += [("The capital of France is a city where", [], SamplingParams(max_tokens=10, ignore_eos=True)),
                 ("Once upon a time", [], SamplingParams(max_tokens=6))]
    return variants


@pytest.fixture(scope="module")
def stack(ray_session, tiny_models):
    s = ServedCluster(ARCH, tiny_models[ARCH],
                      controller={"health_check_period_s": HEALTH_PERIOD_S, "health_check_timeout_s": 5.0,
                                  "health_check_failures": 2, "drain_timeout_s": 60.0},
                      pools={"encoder": {"max_workers": 2}, "decode": {"max_workers": 2}})
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(tiny_models):
    """The colocated engine's outputs for every variant (greedy: the cluster must equal them)."""
    from cluster.config import EngineConfig
    from cluster.engine.colocated import ColocatedEngine

    engine = ColocatedEngine(EngineConfig(model=str(tiny_models[ARCH]), **TEST_ENGINE))
    return engine.generate(request_variants())


class RequestStream:
    """Client threads sending the variants back to back until ``stop``; every outcome is kept."""

    def __init__(self, address: str, num_threads: int = 3):
        self.variants = request_variants()
        self.address = address
        self.num_threads = num_threads
        self.results: list[tuple[int, object]] = []  # (variant index, GenerateResult | Exception)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> "RequestStream":
        for t in range(self.num_threads):
            thread = threading.Thread(target=self._run, args=(t,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, offset: int) -> None:
        with TesseraClient(self.address) as client:
            i = offset
            while not self._stop.is_set():
                index = i % len(self.variants)
                prompt, media, sampling = self.variants[index]
                try:
                    outcome = client.generate(prompt, media, sampling, timeout_s=60)
                except Exception as exc:  # noqa: BLE001 - counted as a failure
                    outcome = exc
                with self._lock:
                    self.results.append((index, outcome))
                i += self.num_threads

    @property
    def num_done(self) -> int:
        with self._lock:
            return len(self.results)

    def stop(self) -> list[tuple[int, object]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        return list(self.results)


def load_of(worker) -> dict:
    import ray

    return ray.get(worker.actor.load.remote(), timeout=30)


def check_results(results, reference) -> None:
    failures = [(i, r) for i, r in results if isinstance(r, Exception) or r.finish_reason not in ("stop", "length")]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:3]}"
    for i, result in results:
        want = reference[i]
        assert (result.token_ids, result.text, result.finish_reason) == (want.token_ids, want.text,
                                                                         want.finish_reason), i


def scale_one_pool_up_and_down(stack, reference, pool: str, served) -> dict:
    """pool 1 -> 2 -> 1 under the stream; returns the controller's scaling events."""
    ctl = stack.cluster.controller
    stream = RequestStream(stack.address).start()
    try:
        wait_for(lambda: stream.num_done >= 3, 60, "the stream to get going")
        before = {w.worker_id for w in ctl.workers(pool)}
        t0 = time.monotonic()
        accepted, message = stack.client.scale({pool: 2})
        assert accepted and message == f"{pool} 1 -> 2"
        assert time.monotonic() - t0 < 2.0  # returns once accepted, not once the worker is ready
        [new] = wait_for(lambda: [w for w in ctl.ready_workers(pool) if w.worker_id not in before], 120,
                         f"a second {pool} worker")
        wait_for(lambda: served(load_of(new)) >= 2, 60, f"{new.worker_id} to serve requests", poll_s=0.2)
        done_at_scale_down = stream.num_done
        accepted, message = stack.client.scale({pool: 1})
        assert accepted and message == f"{pool} 2 -> 1"
        wait_for(lambda: len(ctl.workers(pool)) == 1 and ctl.workers(pool)[0].state == WorkerState.READY, 120,
                 f"{pool} back to one worker")
        wait_for(lambda: stream.num_done >= done_at_scale_down + 6, 60, "requests after the scale-down")
    finally:
        results = stream.stop()
    check_results(results, reference)
    events = [e for e in ctl.history if e.get("pool") == pool and e["event"] in ("ready", "drained")]
    assert [e["event"] for e in events[-2:]] == ["ready", "drained"]
    print(f"\n{pool}: {len(results)} requests, 0 failures; worker ready in {events[-2]['seconds']:.1f} s after "
          f"the scale request, drained in {events[-1]['seconds']:.1f} s")
    return {e["event"]: e["seconds"] for e in events[-2:]}


def test_decode_scales_1_2_1_under_load_without_a_failed_request(stack, reference):
    scale_one_pool_up_and_down(stack, reference, "decode", lambda load: load["num_finished"])


def test_encoder_scales_1_2_1_under_load_without_a_failed_request(stack, reference):
    scale_one_pool_up_and_down(stack, reference, "encoder", lambda load: load["num_encoded_items"])


def test_drain_lets_the_removed_decode_workers_requests_finish(stack, tiny_models):
    """Both decode workers hold a long request when decode goes 2 -> 1: the one removed stops
    getting new work at once but is stopped only after its request finished (token-exact)."""
    from cluster.config import EngineConfig
    from cluster.engine.colocated import ColocatedEngine

    ctl = stack.cluster.controller
    long_request = ("Once upon a time", [], SamplingParams(max_tokens=64, ignore_eos=True))
    [want] = ColocatedEngine(EngineConfig(model=str(tiny_models[ARCH]), **TEST_ENGINE)).generate([long_request])
    assert stack.client.scale({"decode": 2})[0]
    wait_for(lambda: len(ctl.ready_workers("decode")) == 2, 120, "two ready decode workers")
    results: list = [None, None]

    def run(slot: int) -> None:
        with TesseraClient(stack.address) as client:
            results[slot] = client.generate(*long_request)

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(2)]
    for num_busy, thread in enumerate(threads, 1):  # one after the other: the second goes to the idle worker
        thread.start()
        wait_for(lambda: sum(load_of(w)["num_running"] for w in ctl.ready_workers("decode")) == num_busy, 60,
                 f"{num_busy} running decode requests", poll_s=0.02)
    assert all(load_of(w)["num_running"] == 1 for w in ctl.ready_workers("decode"))
    assert stack.client.scale({"decode": 1})[0]
    [draining] = wait_for(lambda: [w for w in ctl.workers("decode") if w.state == WorkerState.DRAINING], 5,
                          "a draining decode worker", poll_s=0.01)
    assert draining not in ctl.ready_workers("decode")  # out of routing at once
    assert load_of(draining)["num_running"] == 1  # still finishing its request
    for thread in threads:
        thread.join(timeout=120)
    wait_for(lambda: ctl.find(draining.worker_id) is None, 60, "the drained worker to be gone")
    for got in results:
        assert (got.token_ids, got.finish_reason) == (want.token_ids, "length")
    [drained] = [e for e in ctl.history if e.get("worker_id") == draining.worker_id and e["event"] == "drained"]
    print(f"\ndrain with a request in flight: {drained['seconds']:.1f} s")


def test_status_shows_pools_states_and_bounds(stack, capsys):
    from cluster.cli import main

    assert main(["status", "--server", stack.address, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    decode = status["pools"]["decode"]
    assert (decode["desired_size"], decode["min_workers"], decode["max_workers"], decode["autoscaling"]) == \
        (1, 1, 2, False)
    assert [w["state"] for w in decode["workers"]] == ["ready"]
    assert main(["status", "--server", stack.address]) == 0
    text = capsys.readouterr().out
    assert "[decode] desired 1 (min 1, max 2, autoscaling off): 1 ready" in text


def test_sigkilled_worker_leaves_routing_within_a_health_period_and_is_replaced(stack, reference):
    ctl = stack.cluster.controller
    [victim] = ctl.ready_workers("decode")
    os.kill(victim.info.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: victim.state != WorkerState.READY, HEALTH_PERIOD_S + RAY_NOTICE_S + 5, "the death to be seen",
             poll_s=0.01)
    detected_s = time.monotonic() - killed_at
    assert victim not in ctl.ready_workers("decode") and victim.state == WorkerState.DEAD
    assert detected_s <= HEALTH_PERIOD_S + RAY_NOTICE_S, detected_s
    [new] = wait_for(lambda: ctl.ready_workers("decode"), 120, "a replacement decode worker")
    refilled_s = time.monotonic() - killed_at
    assert new.worker_id != victim.worker_id and len(ctl.ready_workers("decode")) == 1  # min_workers
    status = stack.client.status()["pools"]["decode"]
    states = {w["id"]: (w["state"], w["error"]) for w in status["workers"]}
    assert states[new.worker_id] == ("ready", "") and states[victim.worker_id][0] == "dead"
    assert "died" in states[victim.worker_id][1]
    # the prefill worker pairs with the newcomer on first use; outputs are unchanged
    prompt, media, sampling = request_variants()[0]
    got = stack.client.generate(prompt, media, sampling)
    assert got.token_ids == reference[0].token_ids
    print(f"\nSIGKILL: out of routing after {detected_s:.2f} s, pool refilled after {refilled_s:.1f} s")


def test_scale_cluster_rejects_bad_sizes_and_checks_api_keys(stack):
    from cluster.cli import main
    from router.grpc_server import GrpcServer

    # without keys (this module's server): anyone may scale; bad sizes are rejected, nothing changes
    accepted, message = stack.client.scale({"decode": 1})
    assert accepted and message == "no change"
    for sizes, words in [({"decode": 3}, "outside"), ({"decode": 0}, "outside"), ({"gpu": 1}, "unknown pool")]:
        accepted, message = stack.client.scale(sizes)
        assert not accepted and words in message, message
    assert stack.cluster.controller.desired_sizes == {"encoder": 1, "prefill": 1, "decode": 1}

    # a second gRPC front door on the same core, with keys
    keys = ("first-key-0123456789", "second-key-9876543210")
    config = stack.config.router.model_copy(update={"api_keys": keys, "grpc_port": 0})

    async def start_server() -> GrpcServer:  # grpc.aio binds a server to the loop it is built on
        server = GrpcServer(stack.core, config)
        await server.start()
        return server

    server = stack.router.run(start_server())
    try:
        with TesseraClient(server.address) as client:
            for key in (None, "wrong", keys[0][:-1], keys[0] + "x"):
                with pytest.raises(grpc.RpcError) as err:
                    client.scale({"decode": 1}, api_key=key)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            bad_scheme = [("authorization", f"Basic {keys[0]}")]
            with pytest.raises(grpc.RpcError) as err:
                client.stub.ScaleCluster(client_request({"decode": 1}), metadata=bad_scheme)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for key in keys:
                assert client.scale({"decode": 1}, api_key=key) == (True, "no change")
            with pytest.raises(grpc.RpcError) as err:  # reads need a key too
                client.status()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with TesseraClient(server.address, api_key=keys[1]) as client:
            assert client.status()["pools"]["decode"]["desired_size"] == 1
        # the CLI: --api-key, or $TESSERA_API_KEY
        assert main(["scale", "--server", server.address, "decode=1"]) == 1
        assert main(["scale", "--server", server.address, "--api-key", keys[1], "decode=1"]) == 0
        os.environ["TESSERA_API_KEY"] = keys[0]
        try:
            assert main(["scale", "--server", server.address, "decode=1", "--wait", "30"]) == 0
            assert main(["scale", "--server", server.address, "decode=9"]) == 1  # rejected: over max
        finally:
            del os.environ["TESSERA_API_KEY"]
        assert main(["scale", "--server", server.address, "decode"]) == 2  # not POOL=N
    finally:
        stack.router.run(server.stop(0))


def client_request(sizes):
    from cluster.api import tessera_pb2 as pb

    return pb.ScaleRequest(desired_sizes=sizes)
