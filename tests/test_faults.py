"""Fault injection (``cluster.faults``) and what a failed model step does to an engine: only the
requests in that step end (finish reason "error", blocks freed); the engine serves the next one."""

from __future__ import annotations

import time

import pytest

from cluster.config import EngineConfig
from cluster.engine.colocated import ColocatedEngine
from cluster.request_types import MediaInput, SamplingParams
from cluster.faults import ENV_VAR, FaultInjector, InjectedFault
from models.media_samples import make_test_image


@pytest.fixture
def enabled(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")


def test_fault_injection_is_refused_unless_enabled(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    faults = FaultInjector("w")
    with pytest.raises(PermissionError, match=ENV_VAR):
        faults.arm("forward")
    faults.hit("forward")  # nothing armed: a no-op


def test_armed_point_skips_then_triggers_count_times(enabled):
    faults = FaultInjector("w")
    with pytest.raises(ValueError):
        faults.arm("nowhere")
    faults.arm("forward", "raise", count=2, skip=1)
    faults.hit("forward")  # skipped
    faults.hit("encode")  # another point
    for _ in range(2):
        with pytest.raises(InjectedFault, match="forward in w"):
            faults.hit("forward")
    faults.hit("forward")  # spent
    assert faults.num_triggered == 2


def test_stall_sleeps(enabled):
    faults = FaultInjector("w")
    faults.arm("kv_send", "stall", seconds=0.2)
    start = time.monotonic()
    faults.hit("kv_send")
    assert time.monotonic() - start >= 0.2


@pytest.fixture(scope="module")
def engine(tiny_models):
    import os

    os.environ[ENV_VAR] = "1"
    try:
        return ColocatedEngine(EngineConfig(model=str(tiny_models["llava-clip-llama"]), kv_cache_memory_gb=0.05))
    finally:
        del os.environ[ENV_VAR]


@pytest.mark.parametrize("point", ["forward", "encode"])
def test_failed_step_ends_only_its_requests_and_the_engine_goes_on(engine, point):
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    image = [MediaInput(make_test_image(3), "image/png")]
    requests = [("USER: <image>\nDescribe it. ASSISTANT:", image, greedy), ("Once upon a time", [], greedy)]
    expected = [c.token_ids for c in engine.generate(requests)]

    # The first request's media is encoded in step 1; "forward" lets 4 steps through (both are
    # decoding by then), "encode" fails the step that encodes the late request's image.
    engine.faults.arm(point, skip=4 if point == "forward" else 0)
    first = engine.add_request(*requests[1])
    outputs = engine.step() if point == "encode" else []  # the text request is prefilled first
    late = engine.add_request(*requests[0])
    finish: dict[str, str] = {}
    tokens: dict[str, list[int]] = {first: [], late: []}
    while engine.has_unfinished():
        for out in outputs + engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finish[out.request_id] = out.finish_reason
        outputs = []
    if point == "forward":  # both were in the failed step
        assert finish == {first: "error", late: "error"}
    else:  # only the request whose media was being encoded
        assert finish == {first: "length", late: "error"} and tokens[first] == expected[1]
    assert engine.kv_blocks_in_use == 0
    assert [c.token_ids for c in engine.generate(requests)] == expected  # serving as before


def test_failed_steps_in_a_row_make_a_worker_report_unhealthy():
    """Three failed model steps in a row: ``load()`` says unhealthy and ``health_probe`` fails, so
    the controller's health checks replace the worker (tested in test_controller.py); one good
    step in between resets the count."""
    import asyncio

    from cluster.worker_base import MAX_CONSECUTIVE_STEP_FAILURES, BaseWorker

    class Worker(BaseWorker):
        pool = "decode"

        def _load(self):
            return {}

    async def run():
        w = Worker("w")
        error = RuntimeError("boom")
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
            w._step_failed(error, 2)
        w._step_ok()
        w._step_failed(error, 2)
        assert (await w.health_probe())["healthy"]
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
            w._step_failed(error, 2)
        load = await w.load()
        assert load["healthy"] is False and load["num_step_failures"] == 2 * MAX_CONSECUTIVE_STEP_FAILURES - 1
        with pytest.raises(RuntimeError, match="in a row failed"):
            await w.health_probe()

    asyncio.run(run())
