"""End to end on CPU: a real local Ray cluster with separate encoder, prefill and decode actors,
KV over gloo, and the real grpc.aio router on 127.0.0.1, driven through the gRPC client.

The reference is ``ColocatedEngine`` with the same engine settings (itself checked against
transformers in test_engine_parity.py): greedy outputs must match token for token.
One cluster per architecture per module (``served_cluster``); tests are ordered by architecture.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.api import tessera_pb2 as pb
from cluster.client import build_request, collect
from cluster.request_types import MediaInput, SamplingParams
from models.media_samples import make_test_audio, make_test_image
from tests.helpers import (decode_finished, long_request, reference, reference_engine, wait_until_idle,
                           worker_counters)
from tests.reference import prompt_cases

pytestmark = pytest.mark.slow

# llava-clip-llama last: the tests after the parity ones reuse its cluster.
PARITY_ORDER = ("llava-siglip-qwen2", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen2-audio", "llava-clip-llama")


# -- parity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", PARITY_ORDER)
def test_greedy_output_equals_colocated_engine(arch, served_cluster, tiny_models):
    stack = served_cluster(arch)
    engine = reference_engine(arch, tiny_models[arch])
    sampling = SamplingParams(max_tokens=16)
    for name, (prompt, media) in prompt_cases(arch).items():
        [want] = reference(engine, [(prompt, media, sampling)])
        got = stack.client.generate(prompt, media, sampling)
        assert got.token_ids == want.token_ids, f"{arch}/{name}"
        assert got.text == want.text, f"{arch}/{name}"
        assert (got.finish_reason, got.prompt_tokens) == (want.finish_reason, want.prompt_tokens), f"{arch}/{name}"
        assert got.chunks[0] == want.token_ids[:1]  # the first chunk is exactly the prefill token
        if media:
            assert got.timings["encode_s"] > 0
    status = wait_until_idle(stack)
    assert status["kv_transfer"]["bytes"] > 0


def test_chat_messages_render_like_the_in_process_template(served_cluster, tiny_models):
    stack = served_cluster("llava-clip-llama")
    engine = reference_engine("llava-clip-llama", tiny_models["llava-clip-llama"])
    images = [MediaInput(make_test_image(3), "image/png"), MediaInput(make_test_image(4), "image/png")]
    # media referenced out of order: index 1 comes first in the conversation
    messages = [{"role": "user", "content": [{"type": "media", "index": 1}, {"type": "text", "text": "and"},
                                             {"type": "media", "index": 0}, {"type": "text", "text": "compare"}]}]
    prompt = engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                      {"type": "text", "text": "compare"}]}])
    sampling = SamplingParams(max_tokens=8)
    [want] = reference(engine, [(prompt, [images[1], images[0]], sampling)])
    got = stack.client.generate(messages=messages, media=images, sampling=sampling)
    assert got.token_ids == want.token_ids and got.text == want.text


# -- concurrency -------------------------------------------------------------------------------
def mixed_requests(arch: str, stop: str) -> list[tuple[str, list[MediaInput], SamplingParams]]:
    cases = list(prompt_cases(arch).values())
    variants = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=1), SamplingParams(max_tokens=20),
                SamplingParams(max_tokens=6, ignore_eos=True), SamplingParams(max_tokens=24, stop=(stop,)),
                SamplingParams(max_tokens=10, stop_token_ids=(7,)), SamplingParams(max_tokens=3),
                SamplingParams(max_tokens=16)]
    return [(cases[i % len(cases)][0], cases[i % len(cases)][1], variants[(i // len(cases)) % len(variants)])
            for i in range(32)]


def test_32_concurrent_streams_of_mixed_modalities(served_cluster, tiny_models):
    arch = "llava-clip-llama"
    stack = served_cluster(arch)
    engine = reference_engine(arch, tiny_models[arch])
    prompt, media = prompt_cases(arch)["one-image"]
    [base] = reference(engine, [(prompt, media, SamplingParams(max_tokens=20))])
    stop = base.text[4:7]
    assert len(stop.strip()) >= 2, base.text
    requests = mixed_requests(arch, stop)
    want = reference(engine, requests)
    assert any(w.finish_reason == "stop" for w in want)  # the stop-string variant really stops

    bytes_before = stack.client.status()["kv_transfer"]
    barrier = threading.Barrier(len(requests))

    def run(req):
        barrier.wait()  # all 32 in flight together
        return stack.client.generate(*req)

    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(run, requests))
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason), i
    status = wait_until_idle(stack)
    shipped = [g for g in got if len(g.token_ids) > 1 or g.finish_reason not in ("length", "stop")
               or (g.finish_reason == "stop" and len(g.token_ids) > 1)]
    kv = status["kv_transfer"]
    assert kv["transfers_completed"] - bytes_before["transfers_completed"] >= len(shipped)
    assert kv["bytes"] > bytes_before["bytes"] and kv["transfers_failed"] == 0


def test_kv_bytes_of_one_request_are_counted_in_cluster_status(served_cluster):
    stack = served_cluster("llava-clip-llama")
    text = stack.core.hf_config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    bytes_per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4  # K+V, float32
    block = stack.config.engine.block_size
    before = stack.client.status()["kv_transfer"]
    got = stack.client.generate("USER: <image>\nHi ASSISTANT:", [MediaInput(make_test_image(9), "image/png")],
                                SamplingParams(max_tokens=4, ignore_eos=True))
    after = wait_until_idle(stack)["kv_transfer"]
    moved = after["bytes"] - before["bytes"]
    blocks = -(-got.prompt_tokens // block)
    assert got.prompt_tokens * bytes_per_token <= moved <= blocks * block * bytes_per_token
    assert after["transfers_completed"] == before["transfers_completed"] + 1
    # layer-wise: started with the prefill step of the prompt's last chunk, not after it
    assert after["transfers_streamed"] == before["transfers_streamed"] + 1
    assert after["transport"] == "auto"  # the default: shm here (one host), gloo across nodes


# -- cancellation, abort, deadline ---------------------------------------------------------------
def test_client_cancel_mid_stream_frees_every_block(served_cluster):
    stack = served_cluster("llava-clip-llama")
    finished_before = decode_finished(stack)
    call = stack.client.stream(long_request())
    chunks = 0
    for resp in call:
        chunks += resp.HasField("chunk")
        if chunks == 3:
            busy = stack.client.status()
            assert any(w["num_kv_blocks_free"] < w["num_kv_blocks_total"]
                       for w in busy["pools"]["decode"]["workers"])
            call.cancel()
            break
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    wait_until_idle(stack)
    assert decode_finished(stack) == finished_before  # aborted, not run to max_tokens


def test_cancel_before_the_first_token_frees_every_block(served_cluster):
    stack = served_cluster("llava-clip-llama")
    for delay in (0.0, 0.05, 0.15):
        call = stack.client.stream(long_request(max_tokens=50))
        time.sleep(delay)
        call.cancel()
        wait_until_idle(stack)


def test_abort_rpc_ends_the_stream_with_abort(served_cluster):
    stack = served_cluster("llava-clip-llama")
    call = stack.client.stream(long_request("abort-me"))
    first = next(call)
    assert first.request_id == "abort-me" and len(first.chunk.token_ids) == 1
    assert stack.client.abort("abort-me") is True
    result = collect(call, time.perf_counter())
    assert result.finish_reason == "abort" and len(result.token_ids) < 1000
    assert stack.client.abort("abort-me") is False  # idempotent: already gone
    wait_until_idle(stack)


def test_deadline_is_propagated_and_frees_every_block(served_cluster):
    stack = served_cluster("llava-clip-llama")
    with pytest.raises(grpc.RpcError) as err:
        stack.client.generate("USER: <image>\nHi ASSISTANT:", [MediaInput(make_test_image(6), "image/png")],
                              SamplingParams(max_tokens=1000, ignore_eos=True), timeout_s=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_idle(stack)


# -- validation, overload, service plumbing ----------------------------------------------------
def invalid_requests():
    img = MediaInput(make_test_image(1), "image/png")
    wav = MediaInput(make_test_audio(1, 1.0), "audio/wav")
    return {
        "corrupt image": build_request("<image> hi", [MediaInput(b"not an image at all", "image/png")]),
        "placeholder count": build_request("<image> and <image>", [img]),
        "media without placeholder": build_request("hello", [img]),
        "audio to an image model": build_request("<image> hi", [wav]),
        "negative temperature": build_request("hi", sampling=SamplingParams(temperature=-1.0)),
        "max_tokens over the limit": build_request("hi", sampling=SamplingParams(max_tokens=100_000)),
        "top_p zero": build_request("hi", sampling=SamplingParams(top_p=0.0)),
        "prompt too long": build_request("word " * 5000),
        "no prompt": pb.GenerateRequest(),
        "media index out of range": build_request(messages=[{"role": "user", "content": [
            {"type": "media", "index": 3}, {"type": "text", "text": "hi"}]}], media=[img]),
        "unreferenced media": build_request(messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}]}], media=[img]),
        "too many media": build_request("<image>" * 9, [img] * 9),
    }


def test_invalid_requests_get_invalid_argument_without_touching_workers(served_cluster):
    stack = served_cluster("llava-clip-llama")
    before = worker_counters(stack)
    for name, request in invalid_requests().items():
        with pytest.raises(grpc.RpcError) as err:
            collect(stack.client.stream(request), time.perf_counter())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert err.value.details(), name
    assert worker_counters(stack) == before


def test_overload_is_resource_exhausted(served_cluster):
    stack = served_cluster("llava-clip-llama")
    admission = stack.core.admission
    limits = admission.max_inflight, admission.max_queued
    admission.max_inflight, admission.max_queued = 1, 0
    try:
        call = stack.client.stream(long_request(max_tokens=200))
        next(call)  # the one slot is taken
        with pytest.raises(grpc.RpcError) as err:
            stack.client.generate("hi", sampling=SamplingParams(max_tokens=2))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        call.cancel()
    finally:
        admission.max_inflight, admission.max_queued = limits
    wait_until_idle(stack)


def test_health_reflection_model_info_and_scale(served_cluster):
    stack = served_cluster("llava-clip-llama")
    assert stack.client.health("") == "SERVING"
    assert stack.client.health("tessera.v1.Tessera") == "SERVING"

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(stack.client.channel)
    [resp] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"tessera.v1.Tessera", "grpc.health.v1.Health"} <= names

    info = stack.client.model_info()
    assert info.architecture == "LlavaForConditionalGeneration"
    assert info.image_placeholder == "<image>" and info.num_tokens_per_image == 256
    assert list(info.modalities) == [pb.MODALITY_TEXT, pb.MODALITY_IMAGE]
    assert info.max_context_length == stack.core.max_model_len and info.eos_token_ids

    # ScaleCluster is served (test_scaling.py scales for real): a bad request is rejected, nothing changes
    resp = stack.client.stub.ScaleCluster(pb.ScaleRequest(desired_sizes={"decode": 2000}))
    assert not resp.accepted and "decode=2000" in resp.message


# -- the CLI against the running cluster -------------------------------------------------------
def test_status_json_shape_from_the_cli(served_cluster):
    stack = served_cluster("llava-clip-llama")
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--server", stack.address, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert set(status["pools"]) == {"encoder", "prefill", "decode"}
    for pool in status["pools"].values():
        assert pool["workers"]
        for worker in pool["workers"]:
            assert worker["id"] and worker["state"] in ("starting", "ready", "draining")
            assert "num_queued_requests" in worker and "num_kv_blocks_free" in worker
    assert status["kv_transfer"]["transport"] == "auto" and isinstance(status["kv_transfer"]["bytes"], int)


@pytest.mark.parametrize("extra", [[], ["--chat"]])
def test_cli_generate_against_the_server_equals_in_process(served_cluster, tiny_models, tmp_path, capsys, extra):
    from cluster.cli import main

    stack = served_cluster("llava-clip-llama")
    image = tmp_path / "cat.png"
    image.write_bytes(make_test_image(7))
    prompt = "Describe the image." if extra else "USER: <image>\nDescribe the image. ASSISTANT:"
    flags = ["--image", str(image), "--max-tokens", "12", "--json", *extra, prompt]
    assert main(["generate", "--model", str(tiny_models["llava-clip-llama"]), *flags]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["generate", "--server", stack.address, *flags]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert set(remote) == set(local) == {"text", "token_ids", "prompt_tokens", "finish_reason", "ttft_s", "tpot_s",
                                         "e2e_s"}
    for key in ("text", "token_ids", "prompt_tokens", "finish_reason"):
        assert remote[key] == local[key], key


def test_cli_generate_reports_invalid_argument(served_cluster, capsys):
    from cluster.cli import main

    stack = served_cluster("llava-clip-llama")
    assert main(["generate", "--server", stack.address, "--temperature", "-1", "hi"]) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


# -- worker failure (last: it breaks this module's cluster) --------------------------------------
def test_dead_worker_is_unavailable_and_shown_dead(served_cluster):
    import ray

    stack = served_cluster("llava-clip-llama")
    [prefill] = stack.cluster.controller.workers("prefill")
    ray.kill(prefill.actor)
    for _ in range(2):  # first: the call fails on the dead actor; then: no ready prefill worker
        with pytest.raises(grpc.RpcError) as err:
            stack.client.generate("hi", sampling=SamplingParams(max_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    status = stack.client.status()
    states = {w["id"]: w["state"] for w in status["pools"]["prefill"]["workers"]}
    assert states[prefill.worker_id] == "dead"  # shown dead (the controller starts a replacement)
    decode = status["pools"]["decode"]["workers"][0]
    deadline = time.monotonic() + 20
    while decode["num_kv_blocks_free"] != decode["num_kv_blocks_total"] and time.monotonic() < deadline:
        time.sleep(0.1)
        decode = stack.client.status()["pools"]["decode"]["workers"][0]
    assert decode["num_kv_blocks_free"] == decode["num_kv_blocks_total"]  # the reservation was given back
