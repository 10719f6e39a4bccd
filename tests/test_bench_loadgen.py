"""benchmarks.workloads (reproducible requests) and benchmarks.loadgen (open/closed loop, bounds),
with a fake client: fast, no servers."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from benchmarks import workloads
from benchmarks.clients import CANCELLED, BenchClient, TesseraGrpcClient, chat_body
from benchmarks.loadgen import LoadConfig, poisson_arrivals, run_load
from benchmarks.workloads import (BenchRequest, WorkloadSpec, generate_requests, list_workloads, load_workload,
                                  with_repeated_media, workload_digest)


# -- workloads --------------------------------------------------------------------------------------------
def test_every_shipped_workload_loads():
    names = list_workloads()
    assert {"text_chat", "single_image", "multi_image", "document", "audio"} <= set(names)
    for name in names:
        assert load_workload(name).name == name
    assert load_workload("audio").modality == "audio"
    assert load_workload("text_chat").modality == "text"
    assert load_workload("chat_mix").modality == "image"


def test_workload_validation(tmp_path):
    with pytest.raises(ValueError, match="no workload"):
        load_workload("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncomponents: [{name: a, images: [3, 1]}]\n")
    with pytest.raises(ValueError, match="images"):
        load_workload(bad)
    bad.write_text("name: x\ncomponents: [{name: a, typo: 1}]\n")
    with pytest.raises(ValueError, match="typo"):
        load_workload(bad)


def test_same_seed_gives_byte_identical_requests():
    spec = load_workload("chat_mix")
    a = generate_requests(spec, 6, seed=7)
    workloads._image.cache_clear()  # regenerate the media bytes, not reuse them
    b = generate_requests(spec, 6, seed=7)
    assert [r.digest() for r in a] == [r.digest() for r in b]
    assert workload_digest(a) == workload_digest(b)
    # ... and identical wire bytes, for both protocols
    assert [json.dumps(chat_body(r, "m")) for r in a] == [json.dumps(chat_body(r, "m")) for r in b]
    grpc = TesseraGrpcClient("unused:0")
    assert [grpc.prepare(r).SerializeToString(deterministic=True) for r in a] == \
           [grpc.prepare(r).SerializeToString(deterministic=True) for r in b]
    assert workload_digest(generate_requests(spec, 6, seed=8)) != workload_digest(a)


def test_requests_follow_the_spec_and_media_never_repeats():
    spec = load_workload("multi_image")
    reqs = generate_requests(spec, 20, seed=0)
    comp = spec.components[0]
    assert all(comp.images[0] <= r.num_images <= comp.images[1] for r in reqs)
    assert all(comp.output_tokens[0] <= r.max_tokens <= comp.output_tokens[1] for r in reqs)
    assert all(r.ignore_eos and r.temperature == 0.0 for r in reqs)
    images = [m.data for r in reqs for m in r.media]
    assert images[0].startswith(b"\x89PNG")
    assert len(set(images)) == len(images)  # no encoder-cache hit unless asked for
    counts = [r.num_images for r in reqs]
    assert len(set(counts)) > 2  # 2..8 really varies


def test_media_pool_repeats_and_mix_weights():
    pooled = generate_requests(load_workload("repeated_image"), 30, seed=0)
    assert len({m.data for r in pooled for m in r.media}) <= 4
    spec = WorkloadSpec.model_validate({"name": "mix", "components": [
        {"name": "text", "weight": 3}, {"name": "audio", "weight": 1, "audios": [1, 1], "audio_seconds": [0.5, 0.5]}]})
    reqs = generate_requests(spec, 400, seed=1)
    share = sum(r.component == "audio" for r in reqs) / len(reqs)
    assert 0.18 < share < 0.32
    audio = next(r for r in reqs if r.component == "audio")
    assert audio.media[0].mime_type == "audio/wav" and audio.media[0].data.startswith(b"RIFF")


def test_repeated_media_pairs():
    reqs = with_repeated_media(generate_requests(load_workload("single_image"), 3, seed=0))
    assert [r.component for r in reqs] == ["miss", "hit"] * 3
    assert reqs[0].media == reqs[1].media and reqs[0].text != reqs[1].text
    assert reqs[0].media != reqs[2].media


def test_http_body_follows_the_openai_spec():
    req = generate_requests(load_workload("multi_image"), 1, seed=0)[0]
    body = chat_body(req, "tiny")
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * req.num_images + ["text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    audio = generate_requests(load_workload("audio"), 1, seed=0)[0]
    part = chat_body(audio, "m")["messages"][0]["content"][0]
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"


# -- load generator -------------------------------------------------------------------------------------------
class FakeClient(BenchClient):
    """Streams ``num_tokens`` tokens ``token_s`` apart after ``ttft_s``; tracks concurrency."""

    name = "fake"

    def __init__(self, ttft_s=0.01, token_s=0.002, num_tokens=4):
        self.ttft_s, self.token_s, self.num_tokens = ttft_s, token_s, num_tokens
        self.inflight = self.max_inflight = 0
        self.sent: list[str] = []

    def prepare(self, req: BenchRequest):
        return req.index

    async def send(self, req, payload, record, timeout_s):
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        self.sent.append(record.request_id)
        record.send_s = time.perf_counter()
        try:
            await asyncio.sleep(self.ttft_s)
            for _ in range(self.num_tokens):
                record.add_chunk(time.perf_counter(), 1)
                await asyncio.sleep(self.token_s)
            record.output_tokens = self.num_tokens
            record.ok = True
        except asyncio.CancelledError:
            record.error = CANCELLED
            raise
        finally:
            record.end_s = time.perf_counter()
            self.inflight -= 1


def text_requests(n: int) -> list[BenchRequest]:
    return generate_requests(load_workload("text_chat"), n, seed=0)


def test_poisson_arrivals_are_seeded_and_at_the_rate():
    a = poisson_arrivals(2000, 4.0, seed=3)
    assert a == poisson_arrivals(2000, 4.0, seed=3) and a[0] == 0.0
    assert np.all(np.diff(a) >= 0)
    assert len(a) / a[-1] == pytest.approx(4.0, rel=0.1)
    assert poisson_arrivals(3, float("inf"), 0) == [0.0, 0.0, 0.0]


def test_closed_loop_keeps_the_concurrency():
    client = FakeClient()
    result = asyncio.run(run_load(client, text_requests(12), LoadConfig(concurrency=3), progress=False))
    assert client.max_inflight == 3
    assert [r.index for r in result.records] == list(range(12)) and all(r.ok for r in result.records)
    assert len(set(client.sent)) == 12  # unique request ids
    assert result.num_not_sent == 0 and not result.hit_time_limit
    assert all(r.send_s >= 0 and r.end_s <= result.duration_s + 1e-6 for r in result.records)


def test_open_loop_follows_the_schedule():
    client = FakeClient()
    config = LoadConfig(rate=50.0, seed=1)
    result = asyncio.run(run_load(client, text_requests(10), config, progress=False))
    expected = poisson_arrivals(10, 50.0, seed=1)
    sends = [r.send_s for r in result.records]
    assert sends == pytest.approx(expected, abs=0.05)
    assert result.send_lag["max"] < 0.05
    assert result.config["mode"] == "open-loop poisson"


def test_time_limit_cancels_and_counts_what_was_cut():
    client = FakeClient(ttft_s=0.05, token_s=0.05, num_tokens=100)  # 5 s per request
    start = time.perf_counter()
    result = asyncio.run(run_load(client, text_requests(50), LoadConfig(rate=20.0, max_duration_s=0.5),
                                  progress=False))
    assert time.perf_counter() - start < 3.0
    assert result.hit_time_limit
    assert result.records and all(not r.ok and r.error == CANCELLED for r in result.records)
    assert result.num_not_sent == 50 - len(result.records) > 0
    assert client.inflight == 0


def test_stop_event_ends_a_background_load():
    async def scenario():
        stop = asyncio.Event()
        client = FakeClient(ttft_s=0.01, token_s=0.01, num_tokens=10)
        background = asyncio.ensure_future(run_load(client, text_requests(1000), LoadConfig(rate=20.0),
                                                    progress=False, stop=stop))
        await asyncio.sleep(0.3)
        stop.set()
        return await background

    result = asyncio.run(scenario())
    assert 0 < len(result.records) < 1000 and not result.hit_time_limit


def test_load_config_validation():
    with pytest.raises(ValueError):
        LoadConfig()
    with pytest.raises(ValueError):
        LoadConfig(rate=1.0, concurrency=2)
    with pytest.raises(ValueError):
        LoadConfig(rate=0.0)
