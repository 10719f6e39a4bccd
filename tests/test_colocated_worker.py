"""The colocated engine as a Ray actor: same tokens as in-process, aborts free everything."""

from __future__ import annotations

import asyncio

import pytest
import ray

from cluster.colocated_worker import ColocatedWorker
from cluster.config import EngineConfig, PoolConfig
from cluster.engine.colocated import ColocatedEngine
from cluster.request_types import SamplingParams
from cluster.worker_base import start_worker
from tests.helpers import CollectingSink, open_token_stream
from tests.reference import prompt_cases


@pytest.fixture(scope="module")
def setup(ray_session, tiny_models):
    engine_cfg = EngineConfig(model=str(tiny_models["llava-clip-llama"]))
    actor = start_worker(ColocatedWorker, PoolConfig(num_cpus=0.5), engine_cfg, "colocated-0")
    ray.get(actor.ready.remote())
    local = ColocatedEngine(engine_cfg)
    yield actor, local
    ray.get(actor.shutdown.remote())
    ray.kill(actor)


async def _start(streams, actor, prepared) -> CollectingSink:
    sink = CollectingSink()
    streams.register("colocated", prepared.request_id, sink)
    await actor.generate.remote(prepared, streams.stream_id)
    return sink


def test_concurrent_requests_equal_in_process_engine(setup):
    actor, local = setup
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    cases = list(prompt_cases("llava-clip-llama").values())
    expected = [c.token_ids for c in local.generate([(p, m, greedy) for p, m in cases])]
    prepared = [local.inputs.prepare(f"r{i}", p, m, greedy) for i, (p, m) in enumerate(cases)]

    async def run_all():
        streams = await open_token_stream(actor, "colocated")
        try:
            sinks = [await _start(streams, actor, p) for p in prepared]
            await asyncio.wait_for(asyncio.gather(*(s.done for s in sinks)), 60)
        finally:
            streams.close()
        return sinks

    sinks = asyncio.run(run_all())
    assert [s.token_ids for s in sinks] == expected
    assert all(s.done.result() == "length" for s in sinks)
    assert all(len(tokens) >= 1 for tokens, _ in sinks[0].deltas[:-1])  # one message per step, tokens in each
    load = ray.get(actor.load.remote())
    assert load["kv_blocks_free"] == load["kv_blocks_total"] and load["healthy"]


def test_abort_mid_stream_frees_blocks(setup):
    actor, local = setup
    prompt, media = prompt_cases("llava-clip-llama")["one-image"]
    prepared = local.inputs.prepare("abort-me", prompt, media, SamplingParams(max_tokens=2000, ignore_eos=True))

    async def run():
        streams = await open_token_stream(actor, "colocated")
        try:
            sink = await _start(streams, actor, prepared)
            await asyncio.wait_for(sink.first, 30)
            assert sink.token_ids  # the first delta holds the first token
            assert await actor.abort.remote("abort-me")
            return await asyncio.wait_for(sink.done, 30)
        finally:
            streams.close()

    assert asyncio.run(run()) == "abort"
    load = ray.get(actor.load.remote())
    assert load["kv_blocks_free"] == load["kv_blocks_total"] and load["num_running"] == 0
