"""The gRPC front door: a thin ``grpc.aio`` servicer translating ``tessera.v1`` protobuf to and
from ``RouterCore``, plus the standard health service and server reflection.

Status codes: ``InvalidRequestError`` and a request that does not parse
(``MalformedRequestInterceptor``) -> INVALID_ARGUMENT, a message over ``router.max_message_mb``
(grpc's own check) and ``OverloadedError`` -> RESOURCE_EXHAUSTED, ``WorkerUnavailableError`` ->
UNAVAILABLE, ``DeadlineExceededError`` -> DEADLINE_EXCEEDED, also after tokens were streamed (a
worker failure the core could not retry or migrate ends the stream with UNAVAILABLE). The client's deadline and
cancellation reach the core (which lets every stage go of the request). With ``router.api_keys``
set, every Tessera method needs ``authorization: Bearer <key>`` metadata (UNAUTHENTICATED
otherwise; ``ApiKeyInterceptor``); health and reflection stay open. With
``router.tls_cert_file`` the port speaks TLS only (``router/tls.py``; mutual TLS with
``tls_client_ca_file``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.api import tessera_pb2 as pb
from cluster.api import tessera_pb2_grpc
from cluster.config import RouterConfig
from cluster.controller import ScaleError
from cluster.engine.inputs import check_chat_size
from cluster.request_types import InvalidRequestError, MediaInput, SamplingParams
from router.auth import AUTH_HEADER, UNAUTHENTICATED_MESSAGE, is_authorized
from router.core import (DeadlineExceededError, FinalEvent, GenerateInput, OverloadedError, RouterCore,
                         RouterError, TokenEvent)
from router.tls import ServerTLS

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tessera"].full_name  # "tessera.v1.Tessera"

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT,
           "error": pb.FINISH_REASON_ERROR}
_MODALITY = {"text": pb.MODALITY_TEXT, "image": pb.MODALITY_IMAGE, "audio": pb.MODALITY_AUDIO,
             "video": pb.MODALITY_VIDEO}
_STATE = {"starting": pb.WORKER_STATE_STARTING, "ready": pb.WORKER_STATE_READY,
          "draining": pb.WORKER_STATE_DRAINING, "dead": pb.WORKER_STATE_DEAD}
# WorkerLoad field <- worker load() keys (first present wins; roles report different ones).
LOAD_FIELDS = {
    "num_queued_requests": ("num_queued_requests", "num_reserved"),
    "num_queued_tokens": ("num_queued_tokens", "num_queued_items"),
    "num_running_requests": ("num_running_requests", "num_running", "num_shipping", "num_encoding_items"),
    "num_kv_blocks_free": ("kv_blocks_free", "num_kv_blocks_free"),
    "num_kv_blocks_total": ("kv_blocks_total", "num_kv_blocks_total"),
    "num_encoder_cache_hits": ("cache_hits",),
    "num_encoder_cache_misses": ("cache_misses",),
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, RouterError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


# -- protobuf -> core ------------------------------------------------------------------------
def sampling_from_proto(sp: pb.SamplingParams, default_max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=sp.max_tokens or default_max_tokens,
        temperature=sp.temperature if sp.HasField("temperature") else 1.0,
        top_p=sp.top_p if sp.HasField("top_p") else 1.0,
        top_k=sp.top_k,
        seed=sp.seed if sp.HasField("seed") else None,
        ignore_eos=sp.ignore_eos,
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else 1.0,
        min_p=sp.min_p,
        min_tokens=sp.min_tokens,
        logprobs=sp.logprobs if sp.HasField("logprobs") else None,
        structured_output=((sp.structured_output.kind, sp.structured_output.value)
                           if sp.HasField("structured_output") else None),
    )


def _logprobs_to_proto(logprobs: list | None) -> list:
    return [pb.TokenLogprob(logprob=lp, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top])
            for lp, top in logprobs or ()]


def input_from_proto(req: pb.GenerateRequest, default_max_tokens: int, timeout_s: float | None) -> GenerateInput:
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("set `prompt` or `messages`")
    messages, template, template_kwargs = None, None, None
    if which == "messages":
        template = req.messages.chat_template or None
        if req.messages.HasField("chat_template_kwargs"):
            template_kwargs = json_format.MessageToDict(req.messages.chat_template_kwargs)
        turns = req.messages.messages
        check_chat_size(len(turns), max((len(m.content) for m in turns), default=0))  # before walking it
        messages = []
        for m in req.messages.messages:
            parts = []
            for part in m.content:
                kind = part.WhichOneof("part")
                if kind == "text":
                    parts.append({"type": "text", "text": part.text})
                elif kind == "media_index":
                    parts.append({"type": "media", "index": part.media_index})
                else:
                    raise InvalidRequestError("a content part sets neither `text` nor `media_index`")
            messages.append({"role": m.role, "content": parts})
    return GenerateInput(
        prompt=req.prompt if which == "prompt" else None,
        messages=messages,
        media=[MediaInput(m.data, m.mime_type) for m in req.media],
        sampling=sampling_from_proto(req.sampling_params, default_max_tokens),
        request_id=req.request_id,
        timeout_s=timeout_s,
        chat_template=template,
        chat_template_kwargs=template_kwargs,
    )


# -- core -> protobuf ------------------------------------------------------------------------
def final_to_proto(ev: FinalEvent, include_timings: bool) -> pb.GenerateFinal:
    final = pb.GenerateFinal(
        finish_reason=_FINISH.get(ev.finish_reason, pb.FINISH_REASON_ERROR), message=ev.message,
        usage=pb.Usage(prompt_tokens=ev.usage.prompt_tokens, prompt_media_tokens=ev.usage.prompt_media_tokens,
                       completion_tokens=ev.usage.completion_tokens))
    if include_timings:
        t = ev.timings
        final.timings.CopyFrom(pb.Timings(
            queue_seconds=t.queue_s, encode_seconds=t.encode_s, prefill_seconds=t.prefill_s,
            kv_transfer_seconds=t.kv_transfer_s, decode_seconds=t.decode_s, ttft_seconds=t.ttft_s,
            e2e_seconds=t.e2e_s))
    return final


def model_info_to_proto(info: dict[str, Any]) -> pb.ModelInfo:
    limits = info["limits"]
    return pb.ModelInfo(
        model_name=info["model_name"], model_path=info["model_path"], architecture=info["architecture"],
        max_context_length=info["max_context_length"], modalities=[_MODALITY[m] for m in info["modalities"]],
        image_placeholder=info["image_placeholder"], audio_placeholder=info["audio_placeholder"],
        video_placeholder=info["video_placeholder"],
        num_tokens_per_image=info["num_tokens_per_image"], audio_tokens_per_second=info["audio_tokens_per_second"],
        dtype=info["dtype"], vocab_size=info["vocab_size"], eos_token_ids=info["eos_token_ids"],
        limits=pb.MediaLimits(max_media_per_request=limits["max_media_per_request"],
                              max_image_pixels=limits["max_image_pixels"],
                              max_audio_seconds=limits["max_audio_seconds"],
                              max_video_seconds=limits["max_video_seconds"],
                              max_video_frames=limits["max_video_frames"],
                              max_media_tokens=limits["max_media_tokens"]))


def worker_load_to_proto(load: dict[str, Any]) -> pb.WorkerLoad:
    out = pb.WorkerLoad()
    for field, keys in LOAD_FIELDS.items():
        for key in keys:
            if key in load:
                setattr(out, field, max(0, int(load[key])))
                break
    return out


def status_to_proto(status: dict[str, Any]) -> pb.ClusterStatus:
    out = pb.ClusterStatus()
    for name, pool in status["pools"].items():
        ps = out.pools.add(name=name, desired_size=pool.get("desired_size", len(pool["workers"])),
                           min_workers=pool.get("min_workers", 0), max_workers=pool.get("max_workers", 0),
                           autoscaling=pool.get("autoscaling", False))
        for w in pool["workers"]:
            gpu_ids = [int(g) for g in w.get("gpu_ids", [])]
            ps.workers.add(worker_id=w["id"], state=_STATE.get(w["state"], pb.WORKER_STATE_UNSPECIFIED),
                           node_id=w.get("node_id", ""), address=w.get("address", ""), gpu_ids=gpu_ids,
                           load=worker_load_to_proto(w), error=w.get("error", ""))
    kv = status["kv_transfer"]
    out.kv_transfer.CopyFrom(pb.KVTransferStatus(
        transport=kv["transport"], num_bytes_transferred=kv.get("bytes", 0),
        num_transfers_completed=kv.get("transfers_completed", 0),
        num_transfers_failed=kv.get("transfers_failed", 0),
        num_transfers_streamed=kv.get("transfers_streamed", 0)))
    return out


# -- the servicer ----------------------------------------------------------------------------
class TesseraServicer(tessera_pb2_grpc.TesseraServicer):
    def __init__(self, core: RouterCore, default_max_tokens: int = 256):
        self.core = core
        self.default_max_tokens = default_max_tokens

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            inp = input_from_proto(request, self.default_max_tokens, context.time_remaining())
            stream = await self.core.submit(inp)
        except (InvalidRequestError, RouterError) as exc:
            await context.abort(status_code(exc), str(exc))
        rid = stream.request_id
        try:
            async for ev in stream:
                if isinstance(ev, TokenEvent):
                    yield pb.GenerateResponse(request_id=rid, chunk=pb.TokenChunk(
                        token_ids=ev.token_ids, text=ev.text, logprobs=_logprobs_to_proto(ev.logprobs)))
                else:
                    yield pb.GenerateResponse(request_id=rid,
                                              final=final_to_proto(ev, request.include_stage_timings))
        except (InvalidRequestError, RouterError) as exc:
            await context.abort(status_code(exc), str(exc))
        finally:
            await stream.aclose()  # no-op when finished; cancels the request if the client left

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.core.abort(request.request_id))

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return model_info_to_proto(self.core.model_info())

    async def GetClusterStatus(self, request, context) -> pb.ClusterStatus:
        return status_to_proto(await self.core.cluster_status())

    async def ScaleCluster(self, request: pb.ScaleRequest, context) -> pb.ScaleResponse:
        """Admin: accepted once the new sizes are set; workers start and drain in the background.
        (API keys are checked for every method by ``ApiKeyInterceptor``.)"""
        try:
            message = self.core.controller.scale(dict(request.desired_sizes), source="ScaleCluster")
        except ScaleError as exc:
            return pb.ScaleResponse(accepted=False, message=str(exc))
        return pb.ScaleResponse(accepted=True, message=message)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """With ``router.api_keys`` set, every Tessera method needs ``authorization: Bearer <key>``
    metadata (UNAUTHENTICATED otherwise). Health and reflection stay open: load balancers and
    tooling probe them without credentials."""

    OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, api_keys: tuple[str, ...]):
        self.api_keys = api_keys

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not self.api_keys or details.method.startswith(self.OPEN_PREFIXES):
            return handler
        presented = next((v for k, v in details.invocation_metadata or () if k.lower() == AUTH_HEADER), None)
        if is_authorized(presented.decode() if isinstance(presented, bytes) else presented, self.api_keys):
            return handler
        return _denying_handler(handler)


def _denying_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails the call with UNAUTHENTICATED."""

    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # unreachable: makes this an async generator, as streaming handlers are

    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **codec)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **codec)
    return grpc.unary_unary_rpc_method_handler(deny, **codec)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """A Tessera request that does not parse as its protobuf message (corrupt wire format, a string
    that is not UTF-8) is the client's error: INVALID_ARGUMENT, where grpc would answer UNKNOWN."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/") or handler.request_streaming:
            return handler
        return _tolerant_handler(handler, details.method)


class _Malformed:
    """What a request that did not parse deserializes to."""


def _tolerant_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` whose deserializer never raises: a malformed request fails with INVALID_ARGUMENT."""
    parse = handler.request_deserializer
    message = f"the {method} request is not a valid protobuf message (corrupt, or a string field is not UTF-8)"

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception:  # noqa: BLE001 - DecodeError, mostly
            return _Malformed()

    async def unary(request, context):
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return await handler.unary_unary(request, context)

    async def stream(request, context):
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        async for response in handler.unary_stream(request, context):
            yield response

    codec = {"request_deserializer": deserialize, "response_serializer": handler.response_serializer}
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **codec)
    return grpc.unary_unary_rpc_method_handler(unary, **codec)


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    """The ``grpc.aio`` server with the Tessera service, health and reflection. Runs on the
    event loop it is started from (the same loop as the core)."""

    def __init__(self, core: RouterCore, config: RouterConfig):
        self.core = core
        self.config = config
        max_bytes = int(config.max_message_mb * 2**20)
        interceptors = [ApiKeyInterceptor(tuple(config.api_keys)), MalformedRequestInterceptor()]
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
        ])
        tessera_pb2_grpc.add_TesseraServicer_to_server(
            TesseraServicer(core, min(config.default_max_tokens, core.config.engine.limits.max_tokens)), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = 0

    @property
    def address(self) -> str:
        return _bind_address(self.config.host, self.port)

    async def start(self) -> str:
        """Bind (TLS when ``router.tls_cert_file`` is set; ``TLSConfigError`` for bad files) and serve."""
        tls = ServerTLS.from_config(self.config)
        address = _bind_address(self.config.host, self.config.grpc_port)
        self.port = (self.server.add_secure_port(address, tls.grpc_credentials()) if tls is not None
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {self.config.host}:{self.config.grpc_port}")
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.address

    async def stop(self, grace_s: float = 5.0) -> None:
        """Health NOT_SERVING, stop taking calls, abort what runs, then close."""
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace_s))
        await self.core.shutdown(grace_s)
        await stopping
