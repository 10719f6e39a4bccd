"""The three worker actors on a real (local) Ray instance with tiny real checkpoints, on CPU.

Requests are driven by hand exactly as the router drives them: encode (ObjectRef passed on
unresolved) -> reserve -> prefill stream (first token, then KVShipped) -> decode over the
router's token stream. Greedy output must equal ``ColocatedEngine.generate`` token for token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch

from cluster.config import EngineConfig, KVTransferConfig, PoolConfig
from cluster.contracts import (
    DecodeRequest,
    EncodeItem,
    KVShipped,
    PrefillFirstToken,
    PrefillRequest,
    Reservation,
)
from cluster.engine.colocated import ColocatedEngine
from cluster.request_types import MediaInput, SamplingParams
from cluster.worker_base import start_worker
from decode_workers.worker import DecodeWorker
from encoder_pool.cache import EncoderCache
from encoder_pool.worker import EncoderWorker
from models.media_samples import make_test_audio, make_test_image
from prefill_workers.worker import PrefillWorker
from tests.helpers import CollectingSink, open_token_stream

pytestmark = pytest.mark.slow

POOL = PoolConfig(num_cpus=0.5, torch_threads=1)
IMAGE_PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TWO_IMAGES_PROMPT = "USER: <image> and then <image>: compare them. ASSISTANT:"
AUDIO_PROMPT = "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat do you hear?"
TEXT_PROMPT = "USER: Tell me a story about a cat. ASSISTANT:"


def image(seed: int) -> MediaInput:
    return MediaInput(make_test_image(seed), "image/png")


def audio(seed: int) -> MediaInput:
    return MediaInput(make_test_audio(seed), "audio/wav")


def test_encoder_cache_is_lru_bounded_by_bytes():
    cache = EncoderCache(max_bytes=3 * 400)  # three [10, 10] float32 tensors
    for key in "abc":
        cache.put(key, torch.full((10, 10), float(ord(key))))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(10, 10))  # evicts b, the least recent
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.num_bytes == 1200 and cache.evictions == 1
    cache.put("huge", torch.zeros(1000))  # larger than the budget: never stored
    assert "huge" not in cache and len(cache) == 3
    assert cache.get("b") is None
    assert (cache.hits, cache.misses) == (1, 1)


# -- the actors of one architecture, and the reference engine in this process ------------------

@dataclass
class Workers:
    arch: str
    engine_config: EngineConfig
    reference: ColocatedEngine
    encoder: object
    prefill: object
    decode: object
    ids: Iterator[int] = field(default_factory=itertools.count)

    def kill(self, ray) -> None:
        actors = (self.encoder, self.prefill, self.decode)
        ray.get([a.shutdown.remote() for a in actors], timeout=30)  # stops loops, closes transports
        for actor in actors:
            ray.kill(actor)


@pytest.fixture(scope="module")
def workers_for(ray_session, tiny_models):
    """(arch, transport) -> Workers; one set of actors alive at a time (2-core machines)."""
    torch.set_num_threads(1)  # the reference engine in this process: oversubscription is ~30x slower
    current: dict[tuple[str, str], Workers] = {}
    transports = {"llava-clip-llama": "gloo", "qwen2-audio": "ray"}  # the default of each; shm has its own test

    def get(arch: str, transport: str | None = None) -> Workers:
        key = (arch, transport or transports[arch])
        if key in current:
            return current[key]
        for old in current.values():
            old.kill(ray_session)
        current.clear()
        config = EngineConfig(model=str(tiny_models[arch]), kv_cache_memory_gb=0.02)
        kv = KVTransferConfig(transport=key[1], timeout_s=20)
        enc = start_worker(EncoderWorker, POOL, config, f"{arch}-encoder-0")
        pre = start_worker(PrefillWorker, POOL, config, f"{arch}-prefill-0", kv_transfer=kv)
        dec = start_worker(DecodeWorker, POOL, config, f"{arch}-decode-0", kv_transfer=kv)
        reference = ColocatedEngine(config)
        infos = ray_session.get([a.ready.remote() for a in (enc, pre, dec)], timeout=180)
        assert [i.pool for i in infos] == ["encoder", "prefill", "decode"]
        current[key] = Workers(arch, config, reference, enc, pre, dec)
        return current[key]

    yield get
    for old in current.values():
        old.kill(ray_session)


# -- the router's path, by hand ----------------------------------------------------------------

@dataclass
class Trace:
    token_ids: list[int]
    finish_reason: str
    prefill_events: list  # [PrefillFirstToken, KVShipped]
    t_first_token: float  # perf_counter when each prefill event reached the driver
    t_kv_shipped: float
    stage_s: dict[str, float]  # encode / reserve / prefill (first token) / kv / decode


async def run_request(w: Workers, prompt: str, media: list[MediaInput], sampling: SamplingParams,
                      request_id: str | None = None) -> Trace:
    rid = request_id or f"{w.arch}-req-{next(w.ids)}"
    prepared = w.reference.inputs.prepare(rid, prompt, media, sampling)  # the router's validation
    eos = tuple(sorted(w.reference.eos_token_ids))
    plan = prepared.plan
    t0 = time.perf_counter()
    stage = {}
    embeddings = None
    if media:
        items = [EncodeItem(d.content_hash, m.mime_type, m.data) for d, m in zip(prepared.media, media)]
        embeddings = w.encoder.encode.remote(items)  # not awaited: the ref goes to prefill as is
    reservation: Reservation = await w.decode.reserve.remote(rid, len(plan.prompt_token_ids), sampling.max_tokens)
    stage["reserve"] = time.perf_counter() - t0
    stream = w.prefill.prefill.options(num_returns="streaming").remote(
        PrefillRequest(rid, plan.prompt_token_ids, plan.media_runs, sampling, eos,
                       [d.content_hash for d in prepared.media]), embeddings, reservation)
    events, times = [], []
    async for ref in stream:
        events.append(await ref)
        times.append(time.perf_counter())
    first, shipped = events
    stage["first_token"] = times[0] - t0
    stage["kv"] = times[1] - times[0]
    t1 = time.perf_counter()
    sink, streams = await start_decode(w, DecodeRequest(
        rid, len(plan.prompt_token_ids), plan.prompt_token_ids, first.token_id, sampling, eos, first.sampler_state))
    try:
        reason = await asyncio.wait_for(sink.done, 60)
    finally:
        streams.close()
    stage["decode"] = time.perf_counter() - t1
    return Trace([first.token_id] + sink.token_ids, reason, events, times[0], times[1], stage)


async def start_decode(w: Workers, request: DecodeRequest, actor=None) -> tuple[CollectingSink, object]:
    """Start ``request`` on the decode worker with its outputs on a token stream of our own."""
    actor = actor or w.decode
    streams = await open_token_stream(actor, "decode")
    sink = CollectingSink()
    streams.register("decode", request.request_id, sink)
    await actor.generate.remote(dataclasses.replace(request, stream_id=streams.stream_id))
    return sink, streams


def reference_tokens(w: Workers, requests) -> list[list[int]]:
    return [c.token_ids for c in w.reference.generate(requests)]


def load(ray, actor) -> dict:
    return ray.get(actor.load.remote())


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# -- tests -------------------------------------------------------------------------------------

LLAVA_CASES = {
    "image": (IMAGE_PROMPT, [image(1)], SamplingParams(max_tokens=12)),
    "two-images": (TWO_IMAGES_PROMPT, [image(2), image(3)], SamplingParams(max_tokens=10)),
    "text-only": (TEXT_PROMPT, [], SamplingParams(max_tokens=12, ignore_eos=True)),
}
AUDIO_CASES = {
    "audio": (AUDIO_PROMPT, [audio(1)], SamplingParams(max_tokens=12)),
    "text-only": (TEXT_PROMPT, [], SamplingParams(max_tokens=8, ignore_eos=True)),
}


def check_greedy_equals_colocated(workers_for, ray_session, arch, cases, transport=None):
    w = workers_for(arch, transport)
    before_sent = load(ray_session, w.prefill)["kv_bytes_sent"]
    before_recv = load(ray_session, w.decode)["kv_bytes_received"]
    expected = reference_tokens(w, list(cases.values()))
    shipped = 0
    for (name, (prompt, media, sampling)), want in zip(cases.items(), expected):
        trace = asyncio.run(run_request(w, prompt, media, sampling))
        assert trace.token_ids == want, name
        first, kv = trace.prefill_events
        assert isinstance(first, PrefillFirstToken) and isinstance(kv, KVShipped), name
        assert trace.t_first_token < trace.t_kv_shipped
        assert kv.num_bytes > 0 and kv.seconds > 0
        shipped += kv.num_bytes
        print(f"\n{arch} {name}: " + " ".join(f"{k}={v * 1e3:.1f}ms" for k, v in trace.stage_s.items())
              + f" kv={kv.num_bytes}B/{kv.seconds * 1e3:.1f}ms prefill={first.prefill_s * 1e3:.1f}ms"
              + f" tokens={len(trace.token_ids)}")
    pre, dec = load(ray_session, w.prefill), load(ray_session, w.decode)
    assert pre["kv_transport"] == dec["kv_transport"] == (transport or pre["kv_transport"])
    assert pre["kv_bytes_sent"] - before_sent == shipped
    assert dec["kv_bytes_received"] - before_recv == shipped
    assert pre["kv_blocks_free"] == pre["kv_blocks_total"]
    assert dec["kv_blocks_free"] == dec["kv_blocks_total"]


def test_llava_greedy_equals_colocated_and_kv_crosses(workers_for, ray_session):
    check_greedy_equals_colocated(workers_for, ray_session, "llava-clip-llama", LLAVA_CASES)


def test_concurrent_requests_match(workers_for, ray_session):
    w = workers_for("llava-clip-llama")
    requests = [
        (IMAGE_PROMPT, [image(10 + i % 3)], SamplingParams(max_tokens=6 + i)) if i % 3 == 0 else
        (TWO_IMAGES_PROMPT, [image(i), image(i + 1)], SamplingParams(max_tokens=5 + i)) if i % 3 == 1 else
        (TEXT_PROMPT, [], SamplingParams(max_tokens=4 + i, ignore_eos=True))
        for i in range(8)
    ]
    expected = reference_tokens(w, requests)

    async def all_at_once():
        return await asyncio.gather(*(run_request(w, *r) for r in requests))

    traces = asyncio.run(all_at_once())
    assert [t.token_ids for t in traces] == expected
    dec = load(ray_session, w.decode)
    assert dec["kv_blocks_free"] == dec["kv_blocks_total"]
    pre = load(ray_session, w.prefill)
    assert pre["kv_blocks_free"] == pre["kv_blocks_total"]


def test_encoder_cache_hits_on_repeated_image(workers_for, ray_session):
    w = workers_for("llava-clip-llama")
    item = image(42)
    digest = w.reference.inputs.prepare("x", IMAGE_PROMPT, [item], SamplingParams()).media[0].content_hash
    before = load(ray_session, w.encoder)
    first = ray_session.get(w.encoder.encode.remote([EncodeItem(digest, item.mime_type, item.data)]))
    second = ray_session.get(w.encoder.encode.remote([EncodeItem(digest, item.mime_type, item.data)]))
    after = load(ray_session, w.encoder)
    assert torch.equal(first[0], second[0])
    assert after["cache_hits"] - before["cache_hits"] == 1
    assert after["cache_misses"] - before["cache_misses"] == 1
    assert after["num_encoded_items"] - before["num_encoded_items"] == 1


def test_prefix_cache_hits_on_repeated_image_and_stays_token_exact(workers_for, ray_session):
    """The same image again with other text: the prefill worker reuses the KV blocks up to the
    text (shipping shared blocks, two requests at once too); output equals the reference."""
    w = workers_for("llava-clip-llama")
    item = image(77)
    first = (IMAGE_PROMPT, [item], SamplingParams(max_tokens=8))
    others = [("USER: <image>\nDescribe it in three words. ASSISTANT:", [item], SamplingParams(max_tokens=8)),
              ("USER: <image>\nWhich colour is most common? ASSISTANT:", [item], SamplingParams(max_tokens=6))]
    expected = reference_tokens(w, [first] + others)
    before = load(ray_session, w.prefill)
    assert asyncio.run(run_request(w, *first)).token_ids == expected[0]
    after_first = load(ray_session, w.prefill)

    async def both():
        return await asyncio.gather(*(run_request(w, *r) for r in others))

    traces = asyncio.run(both())
    after = load(ray_session, w.prefill)
    assert [t.token_ids for t in traces] == expected[1:]
    ids = [w.reference.inputs.prepare("x", p, m, s).plan.prompt_token_ids for p, m, s in [first] + others]
    common = [next(i for i, (a, b) in enumerate(zip(ids[0], other)) if a != b) for other in ids[1:]]
    assert all(n > 256 for n in common)  # image placeholders (same ids, same content hash) and more
    block = w.engine_config.block_size
    shared = sum(n // block * block for n in common)  # full blocks up to where the text differs
    assert after_first["prefix_cache_hit_tokens"] == before["prefix_cache_hit_tokens"]  # a new image
    assert after["prefix_cache_hit_tokens"] - after_first["prefix_cache_hit_tokens"] == shared
    assert after["prefix_cache_query_tokens"] > after_first["prefix_cache_query_tokens"]
    assert after["kv_blocks_free"] == after["kv_blocks_total"] and after["kv_blocks_cached"] > 0
    dec = load(ray_session, w.decode)
    assert dec["kv_blocks_free"] == dec["kv_blocks_total"]


def test_abort_running_decode_frees_blocks(workers_for, ray_session):
    w = workers_for("llava-clip-llama")
    dec = w.decode
    total = load(ray_session, dec)["kv_blocks_total"]

    async def start_then_abort():
        sampling = SamplingParams(max_tokens=200, ignore_eos=True)
        prepared = w.reference.inputs.prepare("abort-me", TEXT_PROMPT, [], sampling)
        n = len(prepared.plan.prompt_token_ids)
        reservation = await dec.reserve.remote("abort-me", n, sampling.max_tokens)
        assert load(ray_session, dec)["kv_blocks_free"] < total
        events = [await r async for r in w.prefill.prefill.options(num_returns="streaming").remote(
            PrefillRequest("abort-me", prepared.plan.prompt_token_ids, [], sampling, ()), None, reservation)]
        sink, streams = await start_decode(w, DecodeRequest(
            "abort-me", n, prepared.plan.prompt_token_ids, events[0].token_id, sampling, ()))
        try:
            assert await dec.abort.remote("abort-me") is True
            await asyncio.wait_for(sink.done, 30)
        finally:
            streams.close()
        return sink

    sink = asyncio.run(start_then_abort())
    assert sink.deltas[-1][1] == "abort"
    assert len(sink.token_ids) < 199
    assert load(ray_session, dec)["kv_blocks_free"] == total
    assert ray_session.get(dec.abort.remote("abort-me")) is False  # already gone


def test_lost_token_stream_aborts_its_requests_and_frees_blocks(workers_for, ray_session):
    """The router's end of the token stream goes away mid-decode (a router that died): the worker
    aborts that stream's requests and frees their blocks."""
    w = workers_for("llava-clip-llama")
    dec = w.decode
    total = load(ray_session, dec)["kv_blocks_total"]

    async def start_then_drop():
        sampling = SamplingParams(max_tokens=300, ignore_eos=True)
        prepared = w.reference.inputs.prepare("cancel-me", TEXT_PROMPT, [], sampling)
        n = len(prepared.plan.prompt_token_ids)
        reservation = await dec.reserve.remote("cancel-me", n, sampling.max_tokens)
        events = [await r async for r in w.prefill.prefill.options(num_returns="streaming").remote(
            PrefillRequest("cancel-me", prepared.plan.prompt_token_ids, [], sampling, ()), None, reservation)]
        sink, streams = await start_decode(w, DecodeRequest(
            "cancel-me", n, prepared.plan.prompt_token_ids, events[0].token_id, sampling, ()))
        await asyncio.wait_for(sink.first, 30)
        assert load(ray_session, dec)["num_running"] == 1
        streams.close()
        return sink

    sink = asyncio.run(start_then_drop())
    wait_for(lambda: load(ray_session, dec)["kv_blocks_free"] == total)
    assert load(ray_session, dec)["num_running"] == 0
    assert len(sink.token_ids) < 299


def test_generate_without_an_open_token_stream_is_refused(workers_for, ray_session):
    w = workers_for("llava-clip-llama")
    reservation = ray_session.get(w.decode.reserve.remote("no-stream", 10, 5))
    request = DecodeRequest("no-stream", 10, [0] * 10, 1, SamplingParams(max_tokens=5), (), None, "router-nobody")
    with pytest.raises(Exception, match="no open token stream"):
        ray_session.get(w.decode.generate.remote(request))
    assert ray_session.get(w.decode.abort.remote("no-stream")) is True
    assert len(reservation.block_ids) > 0
    assert load(ray_session, w.decode)["kv_blocks_free"] == load(ray_session, w.decode)["kv_blocks_total"]


def test_unused_reservation_freed_by_abort(workers_for, ray_session):
    w = workers_for("llava-clip-llama")
    total = load(ray_session, w.decode)["kv_blocks_total"]
    reservation = ray_session.get(w.decode.reserve.remote("never-used", 100, 50))
    assert len(reservation.block_ids) == -(-150 // w.engine_config.block_size)
    assert load(ray_session, w.decode)["kv_blocks_free"] == total - len(reservation.block_ids)
    assert ray_session.get(w.decode.abort.remote("never-used")) is True
    assert load(ray_session, w.decode)["kv_blocks_free"] == total


def test_transfer_to_an_aborted_reservation_fails_cleanly(workers_for, ray_session):
    w = workers_for("llava-clip-llama")
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    prepared = w.reference.inputs.prepare("gone", TEXT_PROMPT, [], sampling)
    ids = prepared.plan.prompt_token_ids
    reservation = ray_session.get(w.decode.reserve.remote("gone", len(ids), sampling.max_tokens))
    assert ray_session.get(w.decode.abort.remote("gone")) is True

    async def prefill():
        events = []
        stream = w.prefill.prefill.options(num_returns="streaming").remote(
            PrefillRequest("gone", ids, [], sampling, ()), None, reservation)
        with pytest.raises(Exception, match="no open reservation"):
            async for ref in stream:
                events.append(await ref)
        return events

    events = asyncio.run(prefill())
    assert [type(e) for e in events] == [PrefillFirstToken]  # the token still went out at once
    for actor in (w.prefill, w.decode):
        stats = load(ray_session, actor)
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_encoder_batches_concurrent_calls(workers_for, ray_session):
    w = workers_for("llava-clip-llama")
    items = []
    for seed in range(100, 104):
        m = image(seed)
        digest = w.reference.inputs.prepare("x", IMAGE_PROMPT, [m], SamplingParams()).media[0].content_hash
        items.append(EncodeItem(digest, m.mime_type, m.data))
    before = load(ray_session, w.encoder)
    outs = ray_session.get([w.encoder.encode.remote([item]) for item in items])
    after = load(ray_session, w.encoder)
    assert all(o[0].shape == outs[0][0].shape for o in outs)
    assert after["num_encoded_items"] - before["num_encoded_items"] == 4
    assert after["num_batches"] - before["num_batches"] < 4  # calls shared forwards


def test_corrupt_media_fails_only_its_own_call(workers_for, ray_session):
    w = workers_for("llava-clip-llama")
    good = image(7)
    digest = w.reference.inputs.prepare("x", IMAGE_PROMPT, [good], SamplingParams()).media[0].content_hash
    bad_ref = w.encoder.encode.remote([EncodeItem("not-an-image", "image/png", b"\x89PNG garbage")])
    good_ref = w.encoder.encode.remote([EncodeItem(digest, good.mime_type, good.data)])
    with pytest.raises(Exception, match="cannot decode image"):
        ray_session.get(bad_ref)
    assert ray_session.get(good_ref)[0].shape[0] == w.reference.processor.tokens_per_image


def test_first_token_that_ends_the_request_ships_no_kv(workers_for, ray_session):
    w = workers_for("llava-clip-llama")
    sampling = SamplingParams(max_tokens=1)
    trace = asyncio.run(run_request(w, TEXT_PROMPT, [], sampling))
    assert trace.token_ids == reference_tokens(w, [(TEXT_PROMPT, [], sampling)])[0]
    assert trace.prefill_events[1] == KVShipped(0, 0.0)
    assert trace.finish_reason == "length"
    assert load(ray_session, w.decode)["kv_blocks_free"] == load(ray_session, w.decode)["kv_blocks_total"]


def test_forks_decode_on_the_parents_prompt_kv_exactly_and_free_everything(workers_for, ray_session):
    """``generate(num_forks=2)`` then two ``fork`` calls: the forks' seeded samples equal the
    reference's for their seeds, with prompts that end mid-block and at a block boundary (the
    copied block is the one holding the prompt's last position). A third fork finds nothing to
    fork from; once all end, every block is free."""
    from cluster.contracts import ForkUnavailableError

    w = workers_for("llava-clip-llama")
    dec, block_size = w.decode, w.engine_config.block_size
    total = load(ray_session, dec)["kv_blocks_total"]
    prompts = [TEXT_PROMPT]
    for k in range(64):  # a prompt that fills its last block exactly
        text = TEXT_PROMPT + " Go" * k
        if len(w.reference.inputs.prepare("x", text, [], SamplingParams()).plan.prompt_token_ids) % block_size == 0:
            prompts.append(text)
            break
    assert len(prompts) == 2

    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=10, ignore_eos=True, temperature=1.0, seed=seed)

    async def parent_and_forks(prompt: str) -> list[list[int]]:
        rid = f"fork-parent-{next(w.ids)}"
        sampling = seeded(7)
        ids = w.reference.inputs.prepare(rid, prompt, [], sampling).plan.prompt_token_ids
        reservation = await dec.reserve.remote(rid, len(ids), sampling.max_tokens)
        first, _ = [await r async for r in w.prefill.prefill.options(num_returns="streaming").remote(
            PrefillRequest(rid, ids, [], sampling, ()), None, reservation)]
        streams = await open_token_stream(dec, "decode")
        sinks = [CollectingSink() for _ in range(3)]
        for i, sink in enumerate(sinks):
            streams.register("decode", f"{rid}-{i}" if i else rid, sink)
        try:
            await dec.generate.remote(DecodeRequest(rid, len(ids), ids, first.token_id, sampling, (),
                                                    first.sampler_state, streams.stream_id), 2)
            assert load(ray_session, dec)["num_fork_sources"] == 1
            for i in (1, 2):
                await dec.fork.remote(rid, DecodeRequest(f"{rid}-{i}", len(ids), ids, None, seeded(7 + i), (),
                                                         stream_id=streams.stream_id))
            assert load(ray_session, dec)["num_fork_sources"] == 0  # both taken: the pin is gone
            with pytest.raises(ForkUnavailableError):
                await dec.fork.remote(rid, DecodeRequest(f"{rid}-3", len(ids), ids, None, seeded(10), (),
                                                         stream_id=streams.stream_id))
            await asyncio.wait_for(asyncio.gather(*(s.done for s in sinks)), 60)
        finally:
            streams.close()
        return [[first.token_id] + sinks[0].token_ids] + [s.token_ids for s in sinks[1:]]

    for prompt in prompts:
        got = asyncio.run(parent_and_forks(prompt))
        want = reference_tokens(w, [(prompt, [], seeded(7 + i)) for i in range(3)])
        assert got == want
        assert len({tuple(t) for t in got}) > 1  # the seeds differ: the forks did not copy the parent
    assert load(ray_session, dec)["kv_blocks_free"] == total


# Last: switching transport or architecture restarts the actors (one set alive at a time).
def test_llava_over_shm_equals_colocated(workers_for, ray_session):
    """Prefill and decode actors on this host pair over the shm transport (a shared-memory ring)."""
    cases = {name: LLAVA_CASES[name] for name in ("image", "text-only")}
    check_greedy_equals_colocated(workers_for, ray_session, "llava-clip-llama", cases, transport="shm")
    w = workers_for("llava-clip-llama", "shm")
    assert load(ray_session, w.decode)["kv_transfers_failed"] == 0


def test_audio_greedy_equals_colocated_and_kv_crosses(workers_for, ray_session):
    check_greedy_equals_colocated(workers_for, ray_session, "qwen2-audio", AUDIO_CASES)
