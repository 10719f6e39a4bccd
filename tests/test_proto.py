"""The public gRPC API: stubs are fresh, the service has the expected shape, messages round-trip."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.api import tessera_pb2, tessera_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_a_fresh_generation():
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_proto_folder_is_not_an_importable_package():
    # `proto` is proto-plus's import name (pulled in by Ray's extras): never shadow it.
    assert not (REPO_ROOT / "proto" / "__init__.py").exists()


def test_descriptor_keeps_its_source_path_and_package():
    assert tessera_pb2.DESCRIPTOR.name == "tessera/v1/tessera.proto"
    assert tessera_pb2.DESCRIPTOR.package == "tessera.v1"


def test_service_methods_and_streaming_kinds():
    service = tessera_pb2.DESCRIPTOR.services_by_name["Tessera"]
    # name -> (input, output, client_streaming, server_streaming)
    expected = {
        "Generate": ("GenerateRequest", "GenerateResponse", False, True),
        "Abort": ("AbortRequest", "AbortResponse", False, False),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False, False),
        "GetClusterStatus": ("GetClusterStatusRequest", "ClusterStatus", False, False),
        "ScaleCluster": ("ScaleRequest", "ScaleResponse", False, False),
    }
    actual = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert actual == expected
    # The generated gRPC module exposes the stub and servicer for the same methods.
    for name in expected:
        assert hasattr(tessera_pb2_grpc.TesseraServicer, name)
    assert callable(tessera_pb2_grpc.add_TesseraServicer_to_server)


def test_oneofs_and_optional_fields():
    request = tessera_pb2.GenerateRequest
    assert [f.name for f in request.DESCRIPTOR.oneofs_by_name["input"].fields] == [
        "prompt", "messages"]
    response = tessera_pb2.GenerateResponse
    assert [f.name for f in response.DESCRIPTOR.oneofs_by_name["response"].fields] == [
        "chunk", "final"]
    params = tessera_pb2.SamplingParams()
    assert not params.HasField("seed")
    assert not params.HasField("temperature")
    params.seed = 0  # explicit 0 is distinguishable from unset
    assert params.HasField("seed")


def test_enums_have_an_unspecified_zero_value():
    for enum in tessera_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0
        assert enum.values[0].name.endswith("_UNSPECIFIED"), enum.name


def _make_request() -> tessera_pb2.GenerateRequest:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # arbitrary, non-UTF-8 bytes
    wav = b"RIFF\x00\x01\x02\x03WAVEfmt " + b"\xff\x00" * 100
    return tessera_pb2.GenerateRequest(
        request_id="req-1",
        messages=tessera_pb2.ChatMessages(messages=[
            tessera_pb2.ChatMessage(role="system", content=[
                tessera_pb2.ContentPart(text="You are terse.")]),
            tessera_pb2.ChatMessage(role="user", content=[
                tessera_pb2.ContentPart(media_index=0),
                tessera_pb2.ContentPart(text="What is in the image and the clip?"),
                tessera_pb2.ContentPart(media_index=1),
            ]),
        ]),
        media=[
            tessera_pb2.MediaPart(data=png, mime_type="image/png"),
            tessera_pb2.MediaPart(data=wav, mime_type="audio/wav"),
        ],
        sampling_params=tessera_pb2.SamplingParams(
            max_tokens=32, temperature=0.0, top_p=0.9, top_k=50, seed=1234,
            stop=["\n\n"], stop_token_ids=[2]),
        include_stage_timings=True,
    )


def test_generate_request_round_trips_with_media_bytes():
    request = _make_request()
    decoded = tessera_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.WhichOneof("input") == "messages"
    assert decoded.media[0].data == request.media[0].data
    assert decoded.media[1].mime_type == "audio/wav"
    user = decoded.messages.messages[1]
    assert [p.WhichOneof("part") for p in user.content] == ["media_index", "text", "media_index"]
    assert user.content[0].media_index == 0  # index 0 is set, not "unset"
    assert decoded.sampling_params.HasField("temperature")
    assert decoded.sampling_params.temperature == 0.0
    assert decoded.sampling_params.seed == 1234
    # Messages pickle by reference to cluster.api (e.g. when passed through Ray).
    assert type(request).__module__ == "cluster.api.tessera_pb2"
    assert pickle.loads(pickle.dumps(request)) == request


def test_generate_response_stream_messages_round_trip():
    chunk = tessera_pb2.GenerateResponse(
        request_id="req-1", chunk=tessera_pb2.TokenChunk(token_ids=[101], text="A"))
    final = tessera_pb2.GenerateResponse(
        request_id="req-1",
        final=tessera_pb2.GenerateFinal(
            finish_reason=tessera_pb2.FINISH_REASON_LENGTH,
            usage=tessera_pb2.Usage(prompt_tokens=600, prompt_media_tokens=576,
                                    completion_tokens=32),
            timings=tessera_pb2.Timings(queue_seconds=0.001, ttft_seconds=0.25,
                                        e2e_seconds=1.5)),
    )
    for message in (chunk, final):
        assert tessera_pb2.GenerateResponse.FromString(message.SerializeToString()) == message
    assert chunk.WhichOneof("response") == "chunk"
    assert final.WhichOneof("response") == "final"
    assert tessera_pb2.FinishReason.Name(final.final.finish_reason) == "FINISH_REASON_LENGTH"


def test_cluster_status_and_scale_messages():
    status = tessera_pb2.ClusterStatus(
        pools=[tessera_pb2.PoolStatus(name="decode", desired_size=2, workers=[
            tessera_pb2.WorkerStatus(
                worker_id="decode-0", state=tessera_pb2.WORKER_STATE_READY, address="10.0.0.2",
                load=tessera_pb2.WorkerLoad(num_running_requests=3, num_kv_blocks_free=100,
                                            num_kv_blocks_total=128))])],
        kv_transfer=tessera_pb2.KVTransferStatus(transport="gloo", num_transfers_completed=7),
    )
    assert tessera_pb2.ClusterStatus.FromString(status.SerializeToString()) == status
    scale = tessera_pb2.ScaleRequest(desired_sizes={"prefill": 2, "decode": 3})
    assert dict(tessera_pb2.ScaleRequest.FromString(scale.SerializeToString()).desired_sizes) == {
        "prefill": 2, "decode": 3}
