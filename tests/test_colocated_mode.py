"""Colocated mode: one ColocatedWorker pool behind the same router, gRPC and HTTP."""

from __future__ import annotations

import os

import pytest

from cluster.config import EngineConfig
from cluster.engine.colocated import ColocatedEngine
from cluster.request_types import SamplingParams
from tests.conftest import TEST_ENGINE, ServedCluster
from tests.reference import prompt_cases

ARCH = "llava-clip-llama"


@pytest.fixture(scope="module")
def colocated(ray_session, tiny_models):
    stack = ServedCluster(ARCH, tiny_models[ARCH], mode="colocated",
                          pools={"colocated": {"num_workers": 1, "num_cpus": 0.5, "cpu_affinity": [0]}})
    yield stack
    stack.close()


def test_greedy_through_colocated_mode_equals_engine(colocated, tiny_models):
    engine = ColocatedEngine(EngineConfig(model=str(tiny_models[ARCH]), **TEST_ENGINE))
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    for name, (prompt, media) in prompt_cases(ARCH).items():
        [expected] = engine.generate([(prompt, media, greedy)])
        got = colocated.client.generate(prompt, media, greedy)
        assert got.token_ids == expected.token_ids, name
        assert got.text == expected.text and got.finish_reason == "length"
    # logprobs ride the colocated worker's token stream too
    prompt, media = prompt_cases(ARCH)["one-image"]
    with_lp = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)
    [expected] = engine.generate([(prompt, media, with_lp)])
    got = colocated.client.generate(prompt, media, with_lp)
    assert [[t for t, _ in top] for _, top in got.logprobs] == [[t for t, _ in top] for _, top in expected.logprobs]
    assert all(abs(a - b) < 1e-4 for (a, _), (b, _) in zip(got.logprobs, expected.logprobs))


def test_status_shows_the_colocated_pool_pinned_and_all_blocks_free(colocated):
    status = colocated.client.status_proto()
    [pool] = [p for p in status.pools]
    assert pool.name == "colocated" and len(pool.workers) == 1
    load = pool.workers[0].load
    assert load.num_kv_blocks_free == load.num_kv_blocks_total > 0
    pid = colocated.cluster.controller.ready_workers("colocated")[0].info.pid
    assert os.sched_getaffinity(pid) == {0}


def test_stop_string_and_abort_in_colocated_mode(colocated):
    prompt, media = prompt_cases(ARCH)["one-image"]
    full = colocated.client.generate(prompt, media, SamplingParams(max_tokens=12, ignore_eos=True))
    stop = full.text[3:6]
    cut = colocated.client.generate(prompt, media, SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
    assert cut.finish_reason == "stop" and full.text.startswith(cut.text) and stop not in cut.text
    load = colocated.client.status_proto().pools[0].workers[0].load
    assert load.num_kv_blocks_free == load.num_kv_blocks_total
