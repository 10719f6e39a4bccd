"""The Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) through a served disaggregated cluster beyond plain gRPC parity (test_cluster_e2e.py):
the OpenAI chat API with ``image_url`` and ``video_url`` parts, and a decode step that fails
mid-stream, migrated (re-prefill of prompt + the tokens sent so far: the prompt at its 3-D
positions, the sent tokens at index + delta) with output identical to the fault-free run."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray

from cluster.controller import WorkerState
from cluster.request_types import MediaInput, SamplingParams
from models.media_samples import make_test_image, make_test_video
from tests.conftest import ServedCluster
from tests.helpers import data_uri, reference, reference_engine, wait_until_idle
from tests.reference import prompt_cases

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=("qwen2-vl", "qwen2.5-vl", "qwen3-vl"))
def stack(request, ray_session, tiny_models):
    s = ServedCluster(request.param, tiny_models[request.param])
    yield s
    s.close()


def test_chat_completions_with_image_and_video_urls_equal_the_engine(stack, tiny_models):
    engine = reference_engine(stack.arch, tiny_models[stack.arch])
    image, video = make_test_image(3, (150, 330)), make_test_video(3, (112, 84), 9, 3)
    question = {"type": "text", "text": "What moved?"}
    prompt = engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, question]}])
    media = [MediaInput(image, "image/png"), MediaInput(video, "video/mp4")]
    [want] = reference(engine, [(prompt, media, SamplingParams(max_tokens=12, ignore_eos=True))])
    content = [{"type": "image_url", "image_url": {"url": data_uri(image)}},
               {"type": "video_url", "video_url": {"url": data_uri(video, "video/mp4")}}, question]
    resp = httpx.post(f"{stack.http_url}/v1/chat/completions", timeout=120,
                      json={"messages": [{"role": "user", "content": content}], "max_tokens": 12,
                            "ignore_eos": True, "temperature": 0})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == want.text
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (want.prompt_tokens, 12)
    wait_until_idle(stack)


def test_decode_failure_mid_stream_is_migrated_with_identical_output(stack, tiny_models):
    engine = reference_engine(stack.arch, tiny_models[stack.arch])
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    reqs = [(prompt, media, greedy) for prompt, media in prompt_cases(stack.arch).values() if media]
    want = [c.token_ids for c in reference(engine, reqs)]
    retries = stack.core.metrics.retries.labels("decode")
    before = retries._value.get()
    [decode] = [w for w in stack.cluster.controller.workers("decode") if w.state is WorkerState.READY]
    ray.get(decode.actor.inject_fault.remote("forward", "raise", skip=5), timeout=30)  # a few tokens in
    with ThreadPoolExecutor(len(reqs)) as pool:
        got = list(pool.map(lambda r: stack.client.generate(*r).token_ids, reqs))
    assert got == want  # re-prefilled (the only decode worker takes it again) and continued exactly
    assert retries._value.get() > before
    wait_until_idle(stack)
