"""The OpenAI-compatible HTTP API and /metrics, end to end on CPU: the official ``openai`` client
(unmodified) and plain httpx against the router that ``served_cluster`` starts (gRPC and HTTP on
one core). The reference is the gRPC API: the same greedy request must give the same text.

Order: qwen2-audio first, then llava-clip-llama (one cluster at a time).
"""

from __future__ import annotations

import base64
import http.server
import threading

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.request_types import MediaInput, SamplingParams
from models.media_samples import make_test_audio, make_test_image
from router.media_urls import host_allowed
from tests.helpers import assert_openai_error, data_uri, wait_until_idle, worker_counters

IMAGE = make_test_image(1)
QUESTION = "What is in this picture?"


def openai_client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


def model_name(stack) -> str:
    return stack.core.model_info()["model_name"]


def stream_chat(stack, content: list[dict], max_tokens: int = 16) -> tuple[str, str, object]:
    """(streamed text, finish reason, usage) of a greedy streaming chat completion."""
    chunks = openai_client(stack).chat.completions.create(
        model=model_name(stack), messages=[{"role": "user", "content": content}], stream=True,
        stream_options={"include_usage": True}, temperature=0, max_tokens=max_tokens)
    texts, finish, usage = [], None, None
    for chunk in chunks:
        if chunk.usage is not None:
            assert chunk.choices == []  # the usage chunk comes last, alone
            usage = chunk.usage
        for choice in chunk.choices:
            texts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(texts), finish, usage


def grpc_chat(stack, text: str, media: list[MediaInput], max_tokens: int = 16):
    parts = [{"type": "media", "index": i} for i in range(len(media))] + [{"type": "text", "text": text}]
    return stack.client.generate(messages=[{"role": "user", "content": parts}], media=media,
                                 sampling=SamplingParams(max_tokens=max_tokens))


def assert_same_as_grpc(streamed, want) -> None:
    text, finish, usage = streamed
    assert text == want.text
    assert finish == want.finish_reason
    assert (usage.prompt_tokens, usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def scrape(stack) -> dict[tuple[str, tuple], float]:
    """/metrics parsed with prometheus_client's parser: {(sample name, sorted labels): value}."""
    resp = httpx.get(f"{stack.http_url}/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


# -- no cluster ----------------------------------------------------------------------------------
def test_media_url_allowlist_matches_hosts_exactly_or_by_subdomain():
    allow = ("images.example.com", "*.cdn.example.org")
    assert host_allowed("images.example.com", allow) and host_allowed("IMAGES.example.com.", allow)
    assert host_allowed("a.cdn.example.org", allow) and host_allowed("a.b.cdn.example.org", allow)
    for host in ("example.com", "evilimages.example.com", "images.example.com.evil.net", "cdn.example.org",
                 "xcdn.example.org", "127.0.0.1"):
        assert not host_allowed(host, allow), host
    assert not host_allowed("images.example.com", ())


@pytest.mark.parametrize("entry", ["https://images.example.com", "images.example.com/x", "host:8080", "*", "*.",
                                   "a b", "*.*.example.com"])
def test_media_url_allowlist_rejects_non_host_entries(entry):
    from cluster.config import RouterConfig

    with pytest.raises(ValueError, match="media_url_allowlist"):
        RouterConfig(media_url_allowlist=(entry,))
    assert RouterConfig(media_url_allowlist=(" Images.Example.com ",)).media_url_allowlist == ("images.example.com",)


# -- audio ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_openai_client_streams_an_audio_chat_equal_to_grpc(served_cluster):
    stack = served_cluster("qwen2-audio")
    wav = make_test_audio(2, 1.5)
    content = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
               {"type": "text", "text": "What do you hear?"}]
    want = grpc_chat(stack, "What do you hear?", [MediaInput(wav, "audio/wav")])
    assert len(want.token_ids) > 1
    assert_same_as_grpc(stream_chat(stack, content), want)


# -- image ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_openai_client_streams_an_image_chat_equal_to_grpc(served_cluster):
    stack = served_cluster("llava-clip-llama")
    want = grpc_chat(stack, QUESTION, [MediaInput(IMAGE, "image/png")])
    assert len(want.token_ids) > 1
    content = [{"type": "image_url", "image_url": {"url": data_uri(IMAGE)}}, {"type": "text", "text": QUESTION}]
    assert_same_as_grpc(stream_chat(stack, content), want)
    # the same request without streaming, max_completion_tokens spelling
    full = openai_client(stack).chat.completions.create(
        model=model_name(stack), messages=[{"role": "user", "content": content}], temperature=0,
        max_completion_tokens=16)
    assert full.choices[0].message.content == want.text and full.choices[0].finish_reason == want.finish_reason
    assert full.usage.completion_tokens == len(want.token_ids)


def prefill_and_fork_counts(stack) -> tuple[int, float]:
    """(prompts prefilled by the prefill pool, samples forked on a decode worker) so far."""
    prefilled = sum(c["num_prefilled"] or 0 for c in worker_counters(stack).values())
    return prefilled, scrape(stack)[("tessera_forked_samples_total", ())]


def test_n_choices_streamed_and_not_each_equal_the_engine_with_seed_plus_i(served_cluster, tiny_models):
    """``n`` choices: choice i is the request sampled with seed + i (vLLM's rule), the usage counts
    the prompt once and every choice's tokens; streamed, the choices' chunks carry their index.
    One prefill serves them all: the other samples fork from the first one's KV on decode."""
    from tests.helpers import reference, reference_engine

    stack = served_cluster("llava-clip-llama")
    engine = reference_engine("llava-clip-llama", tiny_models["llava-clip-llama"])
    prompt = "Once upon a time"
    want = reference(engine, [(prompt, [], SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=5 + i))
                              for i in range(3)])
    assert len({tuple(c.token_ids) for c in want}) > 1  # the seeds do differ
    client = openai_client(stack)
    before = prefill_and_fork_counts(stack)
    got = client.completions.create(model=model_name(stack), prompt=prompt, max_tokens=8, n=3, seed=5,
                                    temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [c.text for c in want]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want[0].prompt_tokens, 24)
    after = prefill_and_fork_counts(stack)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)  # one prefill, two forks
    chunks = client.chat.completions.create(model=model_name(stack), messages=[{"role": "user", "content": prompt}],
                                            max_tokens=6, n=2, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    greedy = grpc_chat(stack, prompt, [], max_tokens=6)
    assert texts == {0: greedy.text, 1: greedy.text} and finishes == {0: "length", 1: "length"}
    assert usage.completion_tokens == 12
    wait_until_idle(stack)


def test_n_samples_of_an_image_prompt_share_one_encode_one_prefill_and_its_kv(served_cluster):
    """Greedy samples of a chat with an image are the single request's output, token for token:
    the forks decode on the first sample's prompt KV (its last block copied, the rest shared).
    A first sample that ends at its first token leaves nothing to fork from: the others are
    prefilled themselves, with the same result. Nothing stays held afterwards."""
    stack = served_cluster("llava-clip-llama")
    client = openai_client(stack)
    content = [{"type": "image_url", "image_url": {"url": data_uri(IMAGE)}}, {"type": "text", "text": QUESTION}]
    want = grpc_chat(stack, QUESTION, [MediaInput(IMAGE, "image/png")], max_tokens=12)
    misses = sum(c["cache_misses"] or 0 for c in worker_counters(stack).values())
    before = prefill_and_fork_counts(stack)
    got = client.chat.completions.create(model=model_name(stack), messages=[{"role": "user", "content": content}],
                                         n=4, temperature=0, max_tokens=12)
    assert [c.message.content for c in got.choices] == [want.text] * 4
    assert got.usage.completion_tokens == 4 * len(want.token_ids)
    after = prefill_and_fork_counts(stack)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)
    assert sum(c["cache_misses"] or 0 for c in worker_counters(stack).values()) == misses  # (cached by grpc_chat)
    one = client.chat.completions.create(model=model_name(stack), messages=[{"role": "user", "content": content}],
                                         n=3, temperature=0, max_tokens=1)
    assert [c.message.content for c in one.choices] == [one.choices[0].message.content] * 3
    assert [c.finish_reason for c in one.choices] == ["length"] * 3
    assert prefill_and_fork_counts(stack) == (after[0] + 3, after[1])  # each prefilled, none forked
    wait_until_idle(stack)


def test_penalties_min_p_and_min_tokens_over_http_and_grpc_equal_the_engine(served_cluster, tiny_models):
    """vLLM's sampling extensions through both front doors, the official client sending OpenAI's
    two penalties and vLLM's three in extra_body: the same tokens as the in-process engine."""
    from tests.helpers import reference, reference_engine

    stack = served_cluster("llava-clip-llama")
    engine = reference_engine("llava-clip-llama", tiny_models["llava-clip-llama"])
    prompt = "Once upon a time, in a land far away"
    params = SamplingParams(max_tokens=48, ignore_eos=True, presence_penalty=1.0, frequency_penalty=2.0,
                            repetition_penalty=1.3, min_p=0.1, min_tokens=8)
    [want] = reference(engine, [(prompt, [], params)])
    [plain] = reference(engine, [(prompt, [], SamplingParams(max_tokens=48, ignore_eos=True))])
    assert want.token_ids != plain.token_ids  # the penalties changed the output
    assert stack.client.generate(prompt, [], params).token_ids == want.token_ids
    got = openai_client(stack).completions.create(
        model=model_name(stack), prompt=prompt, max_tokens=48, temperature=0, presence_penalty=1.0,
        frequency_penalty=2.0, extra_body={"repetition_penalty": 1.3, "min_p": 0.1, "min_tokens": 8,
                                           "ignore_eos": True})
    assert got.choices[0].text == want.text and got.usage.completion_tokens == 48
    with pytest.raises(openai.BadRequestError, match="frequency_penalty must be in"):
        openai_client(stack).completions.create(model=model_name(stack), prompt=prompt, frequency_penalty=3.0)


@pytest.mark.slow
def test_completions_models_and_health(served_cluster):
    stack = served_cluster("llava-clip-llama")
    prompt = "The capital of France is a city where"
    want = stack.client.generate(prompt, [], SamplingParams(max_tokens=10))
    client = openai_client(stack)
    got = client.completions.create(model=model_name(stack), prompt=prompt, max_tokens=10, temperature=0)
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
    streamed = client.completions.create(model=model_name(stack), prompt=prompt, max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text

    models = client.models.list().data
    assert [m.id for m in models] == [model_name(stack)] == ["llava-clip-llama"]
    assert client.models.retrieve(model_name(stack)).id == model_name(stack)
    health = httpx.get(f"{stack.http_url}/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


@pytest.mark.slow
def test_client_disconnect_mid_stream_frees_every_block(served_cluster):
    stack = served_cluster("llava-clip-llama")
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{stack.http_url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data: ")) >= 3
    wait_until_idle(stack)


def invalid_bodies(stack) -> dict[str, tuple[str, dict | bytes, int, str | None]]:
    """name -> (route, body, status, param)."""
    user = [{"role": "user", "content": "hi"}]
    img = {"type": "image_url", "image_url": {"url": data_uri(IMAGE)}}
    wav = {"type": "input_audio", "input_audio": {"data": base64.b64encode(make_test_audio(1, 1.0)).decode(),
                                                  "format": "wav"}}

    def chat(**kw):
        return {"model": model_name(stack), "messages": user, **kw}

    return {
        "not json": ("/v1/chat/completions", b"{not json", 400, None),
        "no messages": ("/v1/chat/completions", {"model": model_name(stack)}, 400, "messages"),
        "empty messages": ("/v1/chat/completions", chat(messages=[]), 400, "messages"),
        "tool role": ("/v1/chat/completions", chat(messages=[{"role": "tool", "content": "x"}]), 400,
                      "messages.0.role"),
        "unknown part": ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "video"}]}]),
                         400, "messages.0.content.0"),
        "temperature not a number": ("/v1/chat/completions", chat(temperature="hot"), 400, "temperature"),
        "negative temperature": ("/v1/chat/completions", chat(temperature=-1), 400, None),
        "top_p zero": ("/v1/chat/completions", chat(top_p=0), 400, None),
        "max_tokens over the limit": ("/v1/chat/completions", chat(max_tokens=100_000), 400, None),
        "too many stop strings": ("/v1/chat/completions", chat(stop=[f"s{i}" for i in range(17)]), 400, None),
        "n=17": ("/v1/chat/completions", chat(n=17), 400, "n"),
        "n=0": ("/v1/chat/completions", chat(n=0), 400, "n"),
        "tools": ("/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
                  "tools"),
        "top_logprobs over 20": ("/v1/chat/completions", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
        "top_logprobs without logprobs": ("/v1/chat/completions", chat(top_logprobs=2), 400, "top_logprobs"),
        "logprobs over 20 (completions)": ("/v1/completions", {"prompt": "hi", "logprobs": 30}, 400, "logprobs"),
        "corrupt image": ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]), 400, None),
        "not base64": ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]), 400,
            "messages.0.content.0.image_url.url"),
        "url without allow-list": ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}}]}]), 400,
            "messages.0.content.0.image_url.url"),
        "audio to an image model": ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [wav]}]),
                                    400, None),
        "too many images": ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [img] * 9}]), 400,
                            "messages"),
        "prompt too long": ("/v1/completions", {"prompt": "word " * 5000}, 400, None),
        "token-id prompt": ("/v1/completions", {"prompt": [1, 2, 3]}, 400, "prompt"),
        "echo": ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
        "unknown model": ("/v1/chat/completions", chat(model="gpt-4o"), 404, "model"),
        "unknown model (completions)": ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    }


@pytest.mark.slow
def test_malformed_requests_get_openai_errors_before_touching_workers(served_cluster):
    stack = served_cluster("llava-clip-llama")
    before = worker_counters(stack)
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        for name, (route, body, status, param) in invalid_bodies(stack).items():
            resp = http.post(route, content=body) if isinstance(body, bytes) else http.post(route, json=body)
            assert_openai_error(resp, status, param)
        assert_openai_error(http.get("/v1/nothing"), 404)
        assert_openai_error(http.post("/v2/chat/completions", json={}), 404)
        assert_openai_error(http.get("/v1/models/gpt-4o"), 404)
    assert worker_counters(stack) == before
    # the official client raises its typed errors for them
    with pytest.raises(openai.BadRequestError):
        openai_client(stack).chat.completions.create(model=model_name(stack), messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        openai_client(stack).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_body_over_the_limit_is_413(served_cluster):
    stack = served_cluster("llava-clip-llama")
    api = stack.router.http.api
    limit, api.max_body_bytes = api.max_body_bytes, 4096
    try:
        content = [{"type": "image_url", "image_url": {"url": data_uri(IMAGE)}}]  # ~100 KB of base64
        resp = httpx.post(f"{stack.http_url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": content}]})
        assert_openai_error(resp, 413)
    finally:
        api.max_body_bytes = limit


@pytest.mark.slow
def test_overload_is_429_and_no_ready_worker_is_503(served_cluster):
    from cluster.controller import WorkerState

    stack = served_cluster("llava-clip-llama")
    url, chat = f"{stack.http_url}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 2}
    admission = stack.core.admission
    limits = admission.max_inflight, admission.max_queued
    admission.max_inflight, admission.max_queued = 0, 0  # full: no slot, no room in the queue
    try:
        assert_openai_error(httpx.post(url, json=chat, timeout=60), 429)
        with pytest.raises(openai.RateLimitError):
            openai_client(stack).chat.completions.create(model=model_name(stack), stream=True, **chat)
    finally:
        admission.max_inflight, admission.max_queued = limits
    wait_until_idle(stack)

    [decode] = stack.cluster.controller.workers("decode")
    decode.state = WorkerState.DRAINING  # no READY decode worker: nothing can take the request
    try:
        assert_openai_error(httpx.post(url, json=chat, timeout=60), 503)
        assert_openai_error(httpx.get(f"{stack.http_url}/health", timeout=30), 503)
    finally:
        decode.state = WorkerState.READY
    assert httpx.post(url, json=chat, timeout=60).status_code == 200


@pytest.mark.slow
def test_media_urls_are_fetched_only_from_allowlisted_hosts(served_cluster):
    stack = served_cluster("llava-clip-llama")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = IMAGE if self.path == "/cat.png" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    resolver = stack.router.http.api.media
    saved = resolver.allowlist, resolver.max_bytes
    resolver.allowlist = ("127.0.0.1",)
    try:
        want = grpc_chat(stack, QUESTION, [MediaInput(IMAGE, "image/png")], max_tokens=6)
        content = [{"type": "image_url", "image_url": {"url": f"{base}/cat.png"}}, {"type": "text", "text": QUESTION}]
        assert_same_as_grpc(stream_chat(stack, content, max_tokens=6), want)

        def post(url: str) -> httpx.Response:
            return httpx.post(f"{stack.http_url}/v1/chat/completions", timeout=60, json={"messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})

        param = "messages.0.content.0.image_url.url"
        assert assert_openai_error(post(f"http://localhost:{server.server_address[1]}/cat.png"), 400,
                                   param)["code"] == "url_not_allowed"
        assert "404" in assert_openai_error(post(f"{base}/missing.png"), 400, param)["message"]
        assert assert_openai_error(post("ftp://127.0.0.1/cat.png"), 400, param)
        resolver.max_bytes = 1000
        assert "bytes" in assert_openai_error(post(f"{base}/cat.png"), 400, param)["message"]
    finally:
        resolver.allowlist, resolver.max_bytes = saved
        server.shutdown()
        server.server_close()


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.slow
def test_the_grafana_dashboard_names_only_metrics_the_router_exports(served_cluster):
    """deploy/grafana/tessera-dashboard.json: every series its PromQL names is a family the
    router's /metrics exports, of the type the suffix needs (_bucket: histogram, _total: counter),
    and every label it filters or groups by is one that family has."""
    import json
    import re
    from pathlib import Path

    stack = served_cluster("llava-clip-llama")
    stream_chat(stack, [{"type": "text", "text": QUESTION}], max_tokens=3)  # every labelled family has a child
    wait_until_idle(stack)
    families = {f.name: f for f in text_string_to_metric_families(
        httpx.get(f"{stack.http_url}/metrics", timeout=30).text)}
    dashboard = json.loads((Path(__file__).parents[1] / "deploy/grafana/tessera-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    suffix_type = {"_bucket": "histogram", "_total": "counter"}
    for expr in exprs:
        for name in re.findall(r"tessera_[a-z0-9_]+", expr):
            suffix = "" if name in families else next((s for s in suffix_type if name.endswith(s)), "")
            family = families.get(name[: len(name) - len(suffix)] if suffix else name)
            assert family is not None, (name, expr)
            assert not suffix or family.type == suffix_type[suffix], (name, family.type)
            labels = {k for sample in family.samples for k in sample.labels} - {"le"}
            for label in re.findall(r"(\w+)\s*(?:!?=~?)\s*\"", expr) + [
                    x.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for x in group.split(",")]:
                assert label in labels | {"le"}, (label, name, expr)


def test_metrics_parse_and_move_with_traffic(served_cluster):
    stack = served_cluster("llava-clip-llama")
    wait_until_idle(stack)
    before = scrape(stack)
    families = {f.name: f.type for f in text_string_to_metric_families(
        httpx.get(f"{stack.http_url}/metrics", timeout=30).text)}
    for name, kind in {"tessera_requests": "counter", "tessera_request_stage_seconds": "histogram",
                       "tessera_time_to_first_token_seconds": "histogram",
                       "tessera_time_per_output_token_seconds": "histogram",
                       "tessera_e2e_request_latency_seconds": "histogram", "tessera_worker_queued_requests": "gauge",
                       "tessera_worker_kv_blocks_used": "gauge", "tessera_worker_kv_blocks_total": "gauge",
                       "tessera_encoder_cache_hit_rate": "gauge", "tessera_encoder_cache_hits": "counter",
                       "tessera_kv_transfer_bytes": "counter", "tessera_http_responses": "counter",
                       "tessera_request_retries": "counter", "tessera_worker_step_seconds": "histogram"}.items():
        assert families.get(name) == kind, name

    image = make_test_image(11)  # new to the encoder cache: one miss, then one hit
    content = [{"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": QUESTION}]
    for _ in range(2):
        stream_chat(stack, content, max_tokens=5)
    httpx.post(f"{stack.http_url}/v1/chat/completions", json={"messages": []}, timeout=30)  # one invalid
    wait_until_idle(stack)
    after = scrape(stack)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    finished = delta("tessera_requests_total", outcome="length") + delta("tessera_requests_total", outcome="stop")
    assert finished == 2
    for stage in ("queue", "encode", "prefill"):
        assert delta("tessera_request_stage_seconds_count", stage=stage) == 2, stage
    assert delta("tessera_time_to_first_token_seconds_count") == 2
    assert delta("tessera_e2e_request_latency_seconds_count") == 2
    assert delta("tessera_generation_tokens_total") >= 2
    assert delta("tessera_encoder_cache_hits_total", worker="encoder-0") == 1
    assert delta("tessera_encoder_cache_misses_total", worker="encoder-0") == 1
    # the same image and text again: the prefill worker reused the KV blocks of the first request
    prefill = next(w.worker_id for w in stack.cluster.controller.workers() if w.pool == "prefill")
    assert delta("tessera_prefix_cache_hit_tokens_total", pool="prefill", worker=prefill) >= 256
    assert delta("tessera_prefix_cache_query_tokens_total", pool="prefill", worker=prefill) > 512
    assert 0 < value(after, "tessera_encoder_cache_hit_rate") <= 1
    assert delta("tessera_http_responses_total", endpoint="/v1/chat/completions", code="200") == 2
    assert delta("tessera_http_responses_total", endpoint="/v1/chat/completions", code="400") == 1
    # per-worker gauges for every worker; idle now, so no KV block is in use
    for w in stack.cluster.controller.workers():
        assert ("tessera_worker_queued_requests", (("pool", w.pool), ("worker", w.worker_id))) in after
        if w.pool != "encoder":
            assert value(after, "tessera_worker_kv_blocks_total", pool=w.pool, worker=w.worker_id) > 0
            assert value(after, "tessera_worker_kv_blocks_used", pool=w.pool, worker=w.worker_id) == 0
    assert value(after, "tessera_workers", pool="decode", state="ready") == 1
    assert delta("tessera_kv_transfer_bytes_total") > 0
    # model steps: one encoder batch (the second request hit the cache), a prefill and decode steps each
    for pool, at_least in (("encoder", 1), ("prefill", 2), ("decode", 2)):
        assert delta("tessera_worker_step_seconds_count", pool=pool) >= at_least, pool
    assert delta("tessera_requests_total", outcome="invalid") == 0  # that 400 came from the HTTP layer, not the core
