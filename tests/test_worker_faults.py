"""Worker faults on a real local Ray cluster (two workers per pool, KV over gloo), driven through
gRPC: a SIGKILLed decode worker under 32 streams (migration: output identical to a fault-free
run; without migration: UNAVAILABLE within 5 s, the other requests untouched), a prefill worker
that dies (retried on the other one), an encoder that fails (retried once, then UNAVAILABLE),
an exception inside a model forward (the worker goes on serving; three in a row: replaced) and
a KV transfer that stalls (ends within its timeout, blocks freed, the pair serves the next
request). Faults are injected with ``cluster.faults`` (TESSERA_FAULT_INJECTION=1 in conftest)
or a real SIGKILL of the worker's process.

The module has its own cluster (it kills workers); tests that kill run last.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray

from cluster.client import TesseraClient
from cluster.controller import WorkerState
from cluster.request_types import MediaInput, SamplingParams
from models.media_samples import make_test_image
from tests.conftest import TEST_ENGINE, ServedCluster
from tests.helpers import wait_for

pytestmark = pytest.mark.slow

ARCH = "llava-clip-llama"
KV_TIMEOUT_S = 2.0
IMAGE_PROMPT = "USER: <image>\nTell me about it. ASSISTANT:"


@pytest.fixture(scope="module")
def stack(ray_session, tiny_models):
    two = {"num_workers": 2, "min_workers": 2, "max_workers": 2}
    s = ServedCluster(ARCH, tiny_models[ARCH],
                      pools={"encoder": two, "prefill": two, "decode": two},
                      kv_transfer={"timeout_s": KV_TIMEOUT_S},
                      controller={"health_check_period_s": 0.5, "health_check_timeout_s": 10.0,
                                  "health_check_failures": 2})
    yield s
    s.close()


@pytest.fixture(scope="module")
def engine(tiny_models):
    from cluster.config import EngineConfig
    from cluster.engine.colocated import ColocatedEngine

    return ColocatedEngine(EngineConfig(model=str(tiny_models[ARCH]), **TEST_ENGINE))


def requests(n: int, max_tokens: int, first_image: int = 100) -> list[tuple[str, list[MediaInput], SamplingParams]]:
    """``n`` greedy requests: two of three with an image of its own, the rest text."""
    greedy = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [(IMAGE_PROMPT, [MediaInput(make_test_image(first_image + i), "image/png")], greedy) if i % 3 else
            (f"Once upon a time, story number {i}", [], greedy) for i in range(n)]


def expected_tokens(engine, reqs) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(list(reqs))]


def workers(stack, pool: str):
    return [w for w in stack.cluster.controller.workers(pool) if w.state is WorkerState.READY]


def arm(worker, point: str, action: str = "raise", **kwargs) -> None:
    ray.get(worker.actor.inject_fault.remote(point, action, **kwargs), timeout=30)


def retries(stack, stage: str) -> float:
    return stack.core.metrics.retries.labels(stage)._value.get()


def wait_until_idle(stack, timeout_s: float = 30.0) -> None:
    def idle():
        status = stack.client.status()
        lm = [w for p in ("prefill", "decode") for w in status["pools"][p]["workers"] if w["state"] == "ready"]
        return stack.core.is_idle and all(w["num_kv_blocks_free"] == w["num_kv_blocks_total"] > 0 for w in lm)

    wait_for(idle, timeout_s, "every KV block free and the router idle")


def wait_for_full_pools(stack, timeout_s: float = 60.0) -> None:
    wait_for(lambda: all(len(workers(stack, p)) == 2 for p in ("encoder", "prefill", "decode")), timeout_s,
             "two ready workers in every pool")


class Streams:
    """Requests streamed from threads; per request: tokens, error code, and the times of chunks."""

    def __init__(self, address: str, reqs):
        self.client = TesseraClient(address)
        self.reqs = reqs
        self.tokens = [[] for _ in reqs]
        self.codes: list[grpc.StatusCode | None] = [None] * len(reqs)
        self.chunk_times = [[] for _ in reqs]
        self.end_times = [0.0] * len(reqs)
        self.started = threading.Barrier(len(reqs) + 1)
        self.pool = ThreadPoolExecutor(len(reqs))
        self.futures = [self.pool.submit(self._run, i) for i in range(len(reqs))]

    def _run(self, i: int) -> None:
        prompt, media, sampling = self.reqs[i]
        from cluster.client import build_request

        call = self.client.stream(build_request(prompt, media, sampling))
        released = False
        try:
            for resp in call:
                if resp.HasField("chunk"):
                    self.tokens[i] += list(resp.chunk.token_ids)
                    self.chunk_times[i].append(time.monotonic())
                    if not released and len(self.tokens[i]) >= 2:
                        released = True
                        self.started.wait(120)
        except grpc.RpcError as exc:
            self.codes[i] = exc.code()
        finally:
            self.end_times[i] = time.monotonic()
            if not released:
                self.started.wait(120)

    def wait(self, timeout_s: float = 120.0) -> None:
        for f in self.futures:
            f.result(timeout_s)
        self.pool.shutdown()
        self.client.close()

    def max_gap_after(self, t0: float, i: int) -> float:
        times = [t for t in self.chunk_times[i] if t >= t0]
        before = [t for t in self.chunk_times[i] if t < t0]
        points = ([before[-1]] if before else []) + times
        return max((b - a for a, b in zip(points, points[1:])), default=0.0)


# -- forward exceptions and encoder failures (the cluster keeps all its workers) ----------------
def test_forward_exception_in_decode_is_migrated_and_the_worker_keeps_serving(stack, engine):
    reqs = requests(6, 24, first_image=10)
    want = expected_tokens(engine, reqs)
    before = retries(stack, "decode")
    arm(workers(stack, "decode")[0], "forward", skip=5)  # a few tokens in, one step raises
    with ThreadPoolExecutor(len(reqs)) as pool:
        got = list(pool.map(lambda r: stack.client.generate(*r).token_ids, reqs))
    assert got == want  # re-prefilled on a decode worker and continued exactly
    assert retries(stack, "decode") > before
    ids = {w.worker_id for w in workers(stack, "decode")}
    assert len(ids) == 2  # nobody was replaced: one failed step is not a broken worker
    wait_until_idle(stack)


def test_a_migrated_request_counts_the_tokens_sent_as_output(stack, engine):
    """min_tokens (and the penalties) count a re-prefill's sent tokens as output, not prompt
    (``num_sent_tokens``): a stop token held back for 20 tokens ends the output where the run
    without a failure ends it when the decode step fails 5 tokens in (the test fails when the
    router drops num_sent_tokens)."""
    story = "Once upon a time, in a land far away"
    [plain] = expected_tokens(engine, [(story, [], SamplingParams(max_tokens=24, ignore_eos=True))])
    stop = plain[21]
    assert stop not in plain[:21]
    held = SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=(stop,), min_tokens=20,
                          frequency_penalty=0.5)
    [want] = expected_tokens(engine, [(story, [], held)])
    before = retries(stack, "decode")
    arm(workers(stack, "decode")[0], "forward", skip=5)
    assert stack.client.generate(story, [], held).token_ids == want
    assert retries(stack, "decode") > before
    wait_until_idle(stack)


def test_forked_samples_migrate_like_any_request_when_their_decode_step_fails(stack, engine):
    """n = 3 greedy: samples 1 and 2 run on sample 0's prompt KV on its decode worker; a step
    there fails mid-stream: all three migrate (re-prefilled with their tokens) and end exactly as
    the single request."""
    import openai

    story = "Once upon a time, a fork in the road"
    [want] = expected_tokens(engine, [(story, [], SamplingParams(max_tokens=150, ignore_eos=True))])
    before, forks = retries(stack, "decode"), stack.core.metrics.forks._value.get()
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0, timeout=120)
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(client.completions.create, model=stack.core.model_info()["model_name"], prompt=story,
                           n=3, max_tokens=150, temperature=0, extra_body={"ignore_eos": True})
        victim = wait_for(lambda: next((w for w in workers(stack, "decode") if w.inflight_requests == 3), None),
                          30, "the three samples on one decode worker")
        arm(victim, "forward", skip=2)
        got = done.result(120)
    assert stack.core.metrics.forks._value.get() == forks + 2
    assert retries(stack, "decode") == before + 3  # each sample migrated once
    assert [c.text for c in got.choices] == [stack.core.tokenizer.decode(want)] * 3
    wait_until_idle(stack)


def test_forward_exception_without_migration_fails_only_that_step(stack, engine):
    core = stack.core
    saved = core.config
    core.config = saved.with_overrides(router={"max_decode_migrations": 0})
    try:
        victim = workers(stack, "decode")[0]
        arm(victim, "forward", skip=3)
        reqs = requests(6, 16, first_image=20)
        want = expected_tokens(engine, reqs)
        streams = Streams(stack.address, reqs)
        streams.started.wait(120)
        streams.wait()
        failed = [i for i, c in enumerate(streams.codes) if c is not None]
        assert failed and all(streams.codes[i] == grpc.StatusCode.UNAVAILABLE for i in failed)
        for i, code in enumerate(streams.codes):
            if code is None:
                assert streams.tokens[i] == want[i]  # the other requests are untouched
        assert victim.state is WorkerState.READY  # and the worker goes on
        got = stack.client.generate(*reqs[0])
        assert got.token_ids == want[0]
    finally:
        core.config = saved
    wait_until_idle(stack)


def test_encoder_failure_is_retried_once_then_unavailable(stack, engine):
    from router import policies

    reqs = requests(2, 8, first_image=30)[1:]  # one image request
    want = expected_tokens(engine, reqs)
    encoders = workers(stack, "encoder")
    before = retries(stack, "encoder")
    for w in encoders:
        arm(w, "encode")
    with pytest.raises(grpc.RpcError) as err:  # fails on one encoder, then on the other
        stack.client.generate(*reqs[0])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "Traceback" not in err.value.details()
    assert retries(stack, "encoder") == before + 1
    # One failure: the encoder the image is affine to fails it, the other one encodes it.
    prompt, media, sampling = reqs[0]
    content_hash = stack.core.preparer.prepare("probe", prompt, media, sampling).media[0].content_hash
    arm(policies.affine_worker(content_hash, encoders), "encode")
    assert stack.client.generate(*reqs[0]).token_ids == want[0]
    assert retries(stack, "encoder") == before + 2
    for w in encoders:
        ray.get(w.actor.clear_faults.remote(), timeout=30)
    wait_until_idle(stack)


def test_stalled_kv_transfer_ends_within_its_timeout_and_the_pair_recovers(stack, engine):
    reqs = requests(3, 12, first_image=40)
    want = expected_tokens(engine, reqs)
    status = stack.client.status()
    failed_before = status["kv_transfer"]["transfers_failed"]
    for w in workers(stack, "prefill"):
        arm(w, "kv_send", "stall", seconds=KV_TIMEOUT_S + 2.0, skip=1)  # mid-transfer: after one layer
    start = time.monotonic()
    got = stack.client.generate(*reqs[1])  # the transfer times out; the request migrates
    assert got.token_ids == want[1]
    assert time.monotonic() - start < KV_TIMEOUT_S + 15
    wait_until_idle(stack)  # the decode reservation of the stalled transfer was freed
    assert stack.client.status()["kv_transfer"]["transfers_failed"] > failed_before
    # the stalled send threads wake up and fail: their transfers end (no prefill worker ships)
    wait_for(lambda: all(ray.get(w.actor.load.remote(), timeout=30)["num_shipping"] == 0
                         for w in workers(stack, "prefill")), KV_TIMEOUT_S + 15, "the stalled sends to end")
    for w in workers(stack, "prefill"):
        ray.get(w.actor.clear_faults.remote(), timeout=30)
    with ThreadPoolExecutor(len(reqs)) as pool:  # every pair serves transfers again
        assert list(pool.map(lambda r: stack.client.generate(*r).token_ids, reqs)) == want
    wait_until_idle(stack)


# -- dying workers (last: they change the cluster's membership) ---------------------------------
def test_prefill_worker_dying_mid_prefill_is_retried_on_the_other(stack, engine):
    reqs = requests(6, 8, first_image=50)
    want = expected_tokens(engine, reqs)
    victim = workers(stack, "prefill")[0]
    arm(victim, "forward", "exit")  # its next step kills its process
    with ThreadPoolExecutor(len(reqs)) as pool:
        got = list(pool.map(lambda r: stack.client.generate(*r).token_ids, reqs))
    assert got == want
    wait_for(lambda: victim.state is WorkerState.DEAD, 10, "the dead prefill worker marked dead")
    wait_for_full_pools(stack)  # and replaced
    wait_until_idle(stack)


def test_decode_sigkill_under_32_streams_migrates_with_identical_output(stack, engine):
    wait_for_full_pools(stack)
    reqs = requests(32, 40, first_image=60)
    want = expected_tokens(engine, reqs)
    streams = Streams(stack.address, reqs)
    streams.started.wait(120)  # every stream has its first tokens
    victim = max(workers(stack, "decode"), key=lambda w: w.inflight_requests)
    assert victim.inflight_requests > 0
    kill_time = time.monotonic()
    os.kill(victim.info.pid, signal.SIGKILL)
    streams.wait()
    assert streams.codes == [None] * len(reqs)  # no request saw an error
    assert streams.tokens == want  # migrated ones continued exactly
    gaps = [streams.max_gap_after(kill_time, i) for i in range(len(reqs))]
    assert max(gaps) < 5.0, gaps  # the migrated streams resumed within 5 s
    wait_for_full_pools(stack)
    wait_until_idle(stack)


def test_decode_sigkill_without_migration_fails_its_requests_within_5s(stack, engine):
    wait_for_full_pools(stack)
    core = stack.core
    saved = core.config
    core.config = saved.with_overrides(router={"max_decode_migrations": 0})
    try:
        reqs = requests(12, 60, first_image=80)
        want = expected_tokens(engine, reqs)
        streams = Streams(stack.address, reqs)
        streams.started.wait(120)
        victim = max(workers(stack, "decode"), key=lambda w: w.inflight_requests)
        kill_time = time.monotonic()
        os.kill(victim.info.pid, signal.SIGKILL)
        streams.wait()
        failed = [i for i, c in enumerate(streams.codes) if c is not None]
        assert failed and {streams.codes[i] for i in failed} == {grpc.StatusCode.UNAVAILABLE}
        for i in failed:  # each failed within 5 s of the kill
            assert streams.end_times[i] - kill_time < 5.0
        for i, code in enumerate(streams.codes):
            if code is None:
                assert streams.tokens[i] == want[i]  # the other worker's requests: 0 errors
    finally:
        core.config = saved
    wait_for_full_pools(stack)
    wait_until_idle(stack)
