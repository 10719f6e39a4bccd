"""The colocated engine as a Ray actor: same tokens as in-process, aborts free everything."""

from __future__ import annotations

import asyncio

import pytest
import ray

from cluster.colocated_worker import ColocatedWorker
from cluster.config import EngineConfig, PoolConfig
from cluster.engine.colocated import ColocatedEngine
from cluster.engine.sampling import SamplingParams
from cluster.worker_base import start_worker
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


async def _collect(actor, prepared):
    tokens, reason = [], None
    async for ref in actor.generate.options(num_returns="streaming").remote(prepared):
        out = await ref
        tokens += out.token_ids
        reason = out.finish_reason
    return tokens, reason


def test_concurrent_requests_equal_in_process_engine(setup):
    actor, local = setup
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    cases = list(prompt_cases("llava-clip-llama").values())
    expected = [c.token_ids for c in local.generate([(p, m, greedy) for p, m in cases])]
    prepared = [local.inputs.prepare(f"r{i}", p, m, greedy) for i, (p, m) in enumerate(cases)]

    async def run_all():
        return await asyncio.gather(*(_collect(actor, p) for p in prepared))

    results = asyncio.run(run_all())
    assert [t for t, _ in results] == expected
    assert all(reason == "length" for _, reason in results)
    load = ray.get(actor.load.remote())
    assert load["kv_blocks_free"] == load["kv_blocks_total"] and load["healthy"]


def test_abort_mid_stream_frees_blocks(setup):
    actor, local = setup
    prompt, media = prompt_cases("llava-clip-llama")["one-image"]
    prepared = local.inputs.prepare("abort-me", prompt, media, SamplingParams(max_tokens=2000, ignore_eos=True))

    async def run():
        gen = actor.generate.options(num_returns="streaming").remote(prepared)
        first = await gen.__anext__()
        assert (await first).token_ids
        assert await actor.abort.remote("abort-me")
        reason = None
        async for ref in gen:
            reason = (await ref).finish_reason
        return reason

    assert asyncio.run(run()) == "abort"
    load = ray.get(actor.load.remote())
    assert load["kv_blocks_free"] == load["kv_blocks_total"] and load["num_running"] == 0
