"""Async benchmark clients: send one ``BenchRequest``, stream the answer, time every chunk.

Two protocols, one interface, so the same run measures Tessera (either API) and a peer engine:

* ``OpenAIChatClient``: ``POST /v1/chat/completions`` with ``stream: true`` and
  ``stream_options.include_usage`` (OpenAI's spec; images as ``image_url`` data URIs, audio as
  ``input_audio`` base64 WAV; ``ignore_eos`` as the vLLM extension). Server-sent events are read
  line by line; a chunk with non-empty ``delta.content`` is one output arrival.
* ``TesseraGrpcClient``: ``tessera.v1.Tessera/Generate`` over ``grpc.aio`` (chat ``messages``
  with media parts first, as the HTTP body has them); token counts per chunk are exact.

Payloads are built by ``prepare`` *before* the clock runs (base64 of a few MB of images is real
CPU work that would otherwise land inside TTFT); ``send`` fills in a ``RequestRecord`` the load
generator owns, so a request cancelled at the run's time limit still leaves its record.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from abc import ABC, abstractmethod
from typing import Any

from benchmarks.metrics import RequestRecord
from benchmarks.workloads import BenchRequest

CANCELLED = "cancelled: run time limit"


class BenchClient(ABC):
    name: str = ""

    async def start(self) -> None:
        """Open connections (inside the event loop that will send)."""

    @abstractmethod
    def prepare(self, req: BenchRequest) -> Any:
        """The request's wire payload, built ahead of the run."""

    @abstractmethod
    async def send(self, req: BenchRequest, payload: Any, record: RequestRecord, timeout_s: float) -> None:
        """Send, stream, and fill ``record`` (never raises, except ``CancelledError``)."""

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> "BenchClient":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _finish(record: RequestRecord, counted: int) -> None:
    record.end_s = time.perf_counter()
    if not record.output_tokens:
        record.output_tokens = counted
    record.ok = not record.error and bool(record.chunk_s) and record.finish_reason not in ("abort", "error")


# -- OpenAI-compatible HTTP -----------------------------------------------------------------------
def chat_body(req: BenchRequest, model: str) -> dict[str, Any]:
    """The chat-completions request body of ``req`` (OpenAI spec + vLLM's ``ignore_eos``)."""
    content: list[dict[str, Any]] = []
    for m in req.media:
        b64 = base64.b64encode(m.data).decode("ascii")
        if m.kind == "image":
            content.append({"type": "image_url", "image_url": {"url": f"data:{m.mime_type};base64,{b64}"}})
        else:
            content.append({"type": "input_audio", "input_audio": {"data": b64, "format": m.mime_type.split("/")[1]}})
    content.append({"type": "text", "text": req.text})
    body: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": req.max_tokens,
        "temperature": req.temperature, "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": req.ignore_eos,
    }
    if req.seed is not None:
        body["seed"] = req.seed
    return body


class OpenAIChatClient(BenchClient):
    name = "openai-http"

    def __init__(self, base_url: str, model: str = "", api_key: str | None = None, tls=None):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.tls = tls  # cluster.client.ClientTLS for an https:// server with its own CA, or None
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.http = None

    async def start(self) -> None:
        import httpx

        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(None, connect=30.0),
                                      verify=self.tls.ssl_context() if self.tls is not None else True,
                                      limits=httpx.Limits(max_connections=4096, max_keepalive_connections=4096))
        if not self.model:  # the server's one model (the OpenAI spec requires the field)
            resp = await self.http.get("/v1/models", timeout=30.0)
            resp.raise_for_status()
            self.model = resp.json()["data"][0]["id"]

    def prepare(self, req: BenchRequest) -> bytes:
        return json.dumps(chat_body(req, self.model)).encode()

    async def send(self, req: BenchRequest, payload: bytes, record: RequestRecord, timeout_s: float) -> None:
        counted = [0]
        record.send_s = time.perf_counter()
        try:
            await asyncio.wait_for(self._stream(payload, record, counted), timeout_s)
        except asyncio.CancelledError:
            record.error = record.error or CANCELLED
            raise
        except asyncio.TimeoutError:
            record.error = f"timeout after {timeout_s:g} s"
        except Exception as exc:  # noqa: BLE001 - connection errors, bad JSON: a failed request
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            _finish(record, counted[0])

    async def _stream(self, payload: bytes, record: RequestRecord, counted: list[int]) -> None:
        async with self.http.stream("POST", "/v1/chat/completions", content=payload, headers=self.headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                record.error = f"HTTP {resp.status_code}: {_error_message(body)}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    record.error = f"stream error: {_error_message(data)}"
                    break
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        record.add_chunk(now, 1)
                        counted[0] += 1
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
                usage = event.get("usage")
                if usage:
                    record.output_tokens = int(usage.get("completion_tokens") or 0)
                    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None


def _error_message(body: str) -> str:
    try:
        err = json.loads(body).get("error")
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (ValueError, AttributeError):
        return body[:300]


# -- Tessera gRPC ---------------------------------------------------------------------------------
class TesseraGrpcClient(BenchClient):
    name = "tessera-grpc"

    def __init__(self, address: str, max_message_mb: float = 64.0, tls=None):
        self.address = address
        self.max_bytes = int(max_message_mb * 2**20)
        self.tls = tls  # cluster.client.ClientTLS for a server with router.tls_cert_file, or None: plaintext
        self.channel = None
        self.stub = None

    async def start(self) -> None:
        import grpc

        from cluster.api import tessera_pb2_grpc

        options = [("grpc.max_send_message_length", self.max_bytes),
                   ("grpc.max_receive_message_length", self.max_bytes)]
        self.channel = (grpc.aio.secure_channel(self.address, self.tls.grpc_credentials(), options=options)
                        if self.tls is not None else grpc.aio.insecure_channel(self.address, options=options))
        await asyncio.wait_for(self.channel.channel_ready(), 30.0)
        self.stub = tessera_pb2_grpc.TesseraStub(self.channel)

    def prepare(self, req: BenchRequest):
        from cluster.client import build_request
        from cluster.request_types import SamplingParams
        from cluster.request_types import MediaInput

        media = [MediaInput(m.data, m.mime_type) for m in req.media]
        parts = [{"type": "media", "index": i} for i in range(len(media))] + [{"type": "text", "text": req.text}]
        sampling = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed,
                                  ignore_eos=req.ignore_eos)
        return build_request(None, media, sampling, messages=[{"role": "user", "content": parts}],
                             include_timings=True)

    async def send(self, req: BenchRequest, payload, record: RequestRecord, timeout_s: float) -> None:
        import grpc

        from cluster.client import FINISH_REASONS

        payload.request_id = record.request_id
        counted = 0
        call = None
        record.send_s = time.perf_counter()
        try:
            call = self.stub.Generate(payload, timeout=timeout_s)
            async for resp in call:
                if resp.HasField("chunk"):
                    n = len(resp.chunk.token_ids)
                    record.add_chunk(time.perf_counter(), n)
                    counted += n
                    continue
                final = resp.final
                record.finish_reason = FINISH_REASONS.get(final.finish_reason, "error")
                record.output_tokens = final.usage.completion_tokens
                record.prompt_tokens = final.usage.prompt_tokens
                if record.finish_reason == "error":
                    record.error = f"finish_reason error: {final.message}"
                if final.HasField("timings"):
                    t = final.timings
                    record.server_timings = {
                        "queue_s": t.queue_seconds, "encode_s": t.encode_seconds, "prefill_s": t.prefill_seconds,
                        "kv_transfer_s": t.kv_transfer_seconds, "decode_s": t.decode_seconds,
                        "ttft_s": t.ttft_seconds, "e2e_s": t.e2e_seconds}
        except asyncio.CancelledError:
            record.error = record.error or CANCELLED
            if call is not None:
                call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            record.error = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            _finish(record, counted)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None


def make_client(target: str, model: str = "", tls=None) -> BenchClient:
    """``grpc://HOST:PORT`` or ``HOST:PORT`` -> gRPC; ``http(s)://...`` -> OpenAI HTTP. ``tls``: a
    ``cluster.client.ClientTLS`` (gRPC: TLS on; HTTPS: the CA and client certificate to use)."""
    if target.startswith(("http://", "https://")):
        return OpenAIChatClient(target, model, tls=tls)
    return TesseraGrpcClient(target.removeprefix("grpc://"), tls=tls)
