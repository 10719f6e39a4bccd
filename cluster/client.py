"""A small synchronous gRPC client of the ``tessera.v1`` API (used by the CLI and the tests).

    with TesseraClient("127.0.0.1:50051") as client:
        result = client.generate("USER: <image>\\nWhat is this? ASSISTANT:", [MediaInput(png, "image/png")],
                                 SamplingParams(max_tokens=32))
        print(result.text, result.ttft_s)
        print(client.status())          # {"pools": {...}, "kv_transfer": {...}}
        client.scale({"decode": 4}, api_key=key)   # (accepted, message); workers start in the background

    TesseraClient("host:50051", tls_ca_file="ca.pem")   # a server with router.tls_cert_file set

Client-side timings follow ``vllm bench serve``: TTFT is request sent -> first chunk received,
TPOT is (E2E - TTFT) / (output tokens - 1).
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api import tessera_pb2 as pb
from cluster.api import tessera_pb2_grpc
from cluster.request_types import MediaInput, SamplingParams

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                  pb.FINISH_REASON_ABORT: "abort", pb.FINISH_REASON_ERROR: "error"}
WORKER_STATES = {pb.WORKER_STATE_STARTING: "starting", pb.WORKER_STATE_READY: "ready",
                 pb.WORKER_STATE_DRAINING: "draining", pb.WORKER_STATE_DEAD: "dead"}


@dataclass
class GenerateResult:
    """One finished request, as `tessera generate --json` prints it (plus the stream's details)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    ttft_s: float
    tpot_s: float
    e2e_s: float
    request_id: str = ""
    message: str = ""
    chunks: list[list[int]] = field(default_factory=list)  # token ids per streamed chunk
    timings: dict[str, float] = field(default_factory=dict)  # server-side stage timings, seconds
    # SamplingParams.logprobs set: per token (logprob, [(token_id, logprob), ...] top alternatives)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The object `tessera generate --json` prints (same keys as the in-process path)."""
        keys = ("text", "token_ids", "prompt_tokens", "finish_reason", "ttft_s", "tpot_s", "e2e_s")
        return {k: v for k, v in asdict(self).items() if k in keys}


def sampling_to_proto(s: SamplingParams) -> pb.SamplingParams:
    out = pb.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                            ignore_eos=s.ignore_eos, stop=list(s.stop), stop_token_ids=list(s.stop_token_ids),
                            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                            repetition_penalty=s.repetition_penalty, min_p=s.min_p, min_tokens=s.min_tokens)
    if s.seed is not None:
        out.seed = s.seed
    if s.logprobs is not None:
        out.logprobs = s.logprobs
    if s.structured_output is not None:
        out.structured_output.kind, out.structured_output.value = s.structured_output
    return out


def build_request(prompt: str | None = None, media: Sequence[MediaInput] = (), sampling: SamplingParams | None = None,
                  *, messages: list[dict] | None = None, request_id: str = "", include_timings: bool = True,
                  chat_template: str = "", chat_template_kwargs: dict | None = None) -> pb.GenerateRequest:
    """``messages``: [{"role": str, "content": [{"type": "text", "text": str} | {"type": "media", "index": i}]}];
    with them, optionally the request's own ``chat_template`` and ``chat_template_kwargs``."""
    req = pb.GenerateRequest(request_id=request_id, include_stage_timings=include_timings,
                             media=[pb.MediaPart(data=m.data, mime_type=m.mime_type) for m in media],
                             sampling_params=sampling_to_proto(sampling or SamplingParams()))
    if messages is not None:
        if chat_template:
            req.messages.chat_template = chat_template
        if chat_template_kwargs:
            req.messages.chat_template_kwargs.update(chat_template_kwargs)
        for turn in messages:
            msg = req.messages.messages.add(role=turn["role"])
            for part in turn["content"]:
                if part["type"] == "text":
                    msg.content.add(text=part["text"])
                else:
                    msg.content.add(media_index=part["index"])
    else:
        req.prompt = prompt or ""
    return req


def status_to_dict(status: pb.ClusterStatus) -> dict[str, Any]:
    """``ClusterStatus`` -> the JSON `tessera status --json` prints."""
    pools: dict[str, Any] = {}
    for pool in status.pools:
        workers = []
        for w in pool.workers:
            load = w.load
            workers.append({
                "id": w.worker_id, "state": WORKER_STATES.get(w.state, "unspecified"), "node_id": w.node_id,
                "address": w.address, "gpu_ids": list(w.gpu_ids),
                "num_queued_requests": load.num_queued_requests, "num_queued_tokens": load.num_queued_tokens,
                "num_running_requests": load.num_running_requests, "num_kv_blocks_free": load.num_kv_blocks_free,
                "num_kv_blocks_total": load.num_kv_blocks_total,
                "num_encoder_cache_hits": load.num_encoder_cache_hits,
                "num_encoder_cache_misses": load.num_encoder_cache_misses,
                "error": w.error,
            })
        pools[pool.name] = {"desired_size": pool.desired_size, "min_workers": pool.min_workers,
                            "max_workers": pool.max_workers, "autoscaling": pool.autoscaling, "workers": workers}
    kv = status.kv_transfer
    return {"pools": pools,
            "kv_transfer": {"transport": kv.transport, "bytes": kv.num_bytes_transferred,
                            "transfers_completed": kv.num_transfers_completed,
                            "transfers_failed": kv.num_transfers_failed,
                            "transfers_streamed": kv.num_transfers_streamed}}


@dataclass(frozen=True)
class ClientTLS:
    """How a client speaks TLS to a server with ``router.tls_cert_file`` set: ``ca_file`` (PEM)
    verifies the server's certificate ("": the system's roots); ``cert_file`` + ``key_file`` (PEM)
    are this client's certificate for a server that requires one (``router.tls_client_ca_file``)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both its file and its key file (or neither)")

    @classmethod
    def of(cls, ca_file: str | None = None, cert_file: str | None = None,
           key_file: str | None = None) -> "ClientTLS | None":
        """None (plaintext) when no file is given."""
        if not (ca_file or cert_file or key_file):
            return None
        return cls(ca_file or "", cert_file or "", key_file or "")

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_file), private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS clients (``httpx``'s ``verify=``)."""
        context = ssl.create_default_context(cafile=self.ca_file or None)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


class TesseraClient:
    def __init__(self, address: str, *, api_key: str | None = None, max_message_mb: float = 64.0,
                 tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None):
        """``api_key``: sent as ``authorization: Bearer <key>`` on every call (servers with
        ``router.api_keys`` refuse calls without one). Any ``tls_*`` file: TLS (see ``ClientTLS``);
        none: plaintext."""
        max_bytes = int(max_message_mb * 2**20)
        self.address = address
        self.metadata = _auth_metadata(api_key)
        options = [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]
        tls = ClientTLS.of(tls_ca_file, tls_cert_file, tls_key_file)
        self.channel = (grpc.secure_channel(address, tls.grpc_credentials(), options=options) if tls is not None
                        else grpc.insecure_channel(address, options=options))
        self.stub = tessera_pb2_grpc.TesseraStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "TesseraClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- Generate ------------------------------------------------------------------------------
    def stream(self, request: pb.GenerateRequest, timeout_s: float | None = None):
        """The raw response stream (an iterator that is also a ``grpc.Call``: ``.cancel()``)."""
        return self.stub.Generate(request, timeout=timeout_s, metadata=self.metadata)

    def generate(self, prompt: str | None = None, media: Sequence[MediaInput] = (),
                 sampling: SamplingParams | None = None, *, messages: list[dict] | None = None,
                 request_id: str = "", timeout_s: float | None = None, on_chunk=None,
                 chat_template: str = "", chat_template_kwargs: dict | None = None) -> GenerateResult:
        """Run one request to the end; ``on_chunk(token_ids, text)`` sees each chunk as it arrives.
        Raises ``grpc.RpcError`` when the call fails before its final message."""
        request = build_request(prompt, media, sampling, messages=messages, request_id=request_id or uuid.uuid4().hex,
                                chat_template=chat_template, chat_template_kwargs=chat_template_kwargs)
        start = time.perf_counter()
        return collect(self.stream(request, timeout_s), start, on_chunk)

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id), metadata=self.metadata).found

    # -- info ------------------------------------------------------------------------------------
    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    def status_proto(self) -> pb.ClusterStatus:
        return self.stub.GetClusterStatus(pb.GetClusterStatusRequest(), metadata=self.metadata)

    def status(self) -> dict[str, Any]:
        return status_to_dict(self.status_proto())

    # -- admin -----------------------------------------------------------------------------------
    def scale(self, desired_sizes: dict[str, int], api_key: str | None = None,
              timeout_s: float = 30.0) -> tuple[bool, str]:
        """ScaleCluster: (accepted, message). Returns once the server accepted or rejected the new
        sizes; workers then start or drain (watch ``status()``). Raises ``grpc.RpcError``
        (UNAUTHENTICATED without a valid ``api_key`` when the server has keys)."""
        metadata = _auth_metadata(api_key) if api_key else self.metadata
        resp = self.stub.ScaleCluster(pb.ScaleRequest(desired_sizes=desired_sizes), metadata=metadata,
                                      timeout=timeout_s)
        return resp.accepted, resp.message

    def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... of ``service`` ("" = the whole server)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)


def _auth_metadata(api_key: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {api_key}")] if api_key else None


def collect(responses: Iterator[pb.GenerateResponse], start: float, on_chunk=None) -> GenerateResult:
    tokens: list[int] = []
    chunks: list[list[int]] = []
    text: list[str] = []
    logprobs: list | None = None
    ttft = None
    request_id = ""
    for resp in responses:
        request_id = resp.request_id
        if resp.HasField("chunk"):
            if ttft is None:
                ttft = time.perf_counter() - start
            ids = list(resp.chunk.token_ids)
            tokens += ids
            chunks.append(ids)
            text.append(resp.chunk.text)
            if resp.chunk.logprobs:
                logprobs = (logprobs or []) + [(lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
                                               for lp in resp.chunk.logprobs]
            if on_chunk is not None:
                on_chunk(ids, resp.chunk.text)
            continue
        final = resp.final
        e2e = time.perf_counter() - start
        ttft = e2e if ttft is None else ttft
        timings = {}
        if final.HasField("timings"):
            t = final.timings
            timings = {"queue_s": t.queue_seconds, "encode_s": t.encode_seconds, "prefill_s": t.prefill_seconds,
                       "kv_transfer_s": t.kv_transfer_seconds, "decode_s": t.decode_seconds,
                       "ttft_s": t.ttft_seconds, "e2e_s": t.e2e_seconds}
        return GenerateResult(
            "".join(text), tokens, final.usage.prompt_tokens, FINISH_REASONS.get(final.finish_reason, "error"),
            ttft, (e2e - ttft) / max(len(tokens) - 1, 1), e2e, request_id, final.message, chunks, timings, logprobs)
    raise RuntimeError("the Generate stream ended without a final message")
