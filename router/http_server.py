"""The OpenAI-compatible HTTP front door: a thin FastAPI app over ``RouterCore``, served by uvicorn
on the router's event loop (``HttpServer``), beside the gRPC server.

    POST /v1/chat/completions   chat (text, image_url, input_audio parts), stream or not
    POST /v1/completions        raw prompt (with the model's own placeholders; text-only here)
    GET  /v1/models[/{id}]      the one served model
    GET  /health                200 when every pool has a ready worker, else 503
    GET  /metrics               Prometheus (router.metrics)

Like the gRPC servicer it only translates: request JSON -> ``GenerateInput`` (chat messages become
the same chat turns gRPC ``messages`` use, rendered by the core with the model's template), and
core events -> OpenAI JSON / SSE chunks. Validation, routing and admission are the core's.

Status codes (always OpenAI's error shape): malformed or invalid input 400 (before any worker is
touched), unknown model or route 404, body over ``router.max_http_body_mb`` 413, admission full
429, no ready worker / worker failure 503, deadline 504. A stream answers its status only once the
first token is in, so a request that fails before it gets a real status code; a failure after it
ends the stream with an ``{"error": ...}`` event. A client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.config import RouterConfig
from cluster.request_types import InvalidRequestError
from router import openai_protocol as oa
from router.core import (DeadlineExceededError, FinalEvent, GenerateInput, OverloadedError, RequestStream,
                         RouterCore, RouterError, TokenEvent)
from router.auth import AUTH_HEADER, UNAUTHENTICATED_MESSAGE, is_authorized
from router.media_urls import MediaResolver
from router.openai_protocol import HTTPError
from router.openai_shapes import ChatShape, TextShape, usage_of
from router.tls import ServerTLS

log = logging.getLogger(__name__)

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def error_of(exc: BaseException) -> HTTPError:
    """A core error -> its HTTP status (the same mapping as the gRPC status codes)."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return HTTPError(400, str(exc), code="invalid_value")
    if isinstance(exc, OverloadedError):
        return HTTPError(429, str(exc), code="overloaded")
    if isinstance(exc, DeadlineExceededError):
        return HTTPError(504, str(exc), code="deadline_exceeded")
    if isinstance(exc, RouterError):
        return HTTPError(503, str(exc), code="unavailable")
    return HTTPError(500, f"internal error: {type(exc).__name__}", code="internal_error")


def _error_response(err: HTTPError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _on_http_error(request: Request, exc: HTTPError) -> JSONResponse:
    return _error_response(exc)


async def _on_starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    return _error_response(HTTPError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                     code=code))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return _error_response(error_of(exc))


def _sse(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


# -- the two response shapes -------------------------------------------------------------------
# Streamed chunks are plain dicts serialized with orjson (a chunk per token is the hot path);
# each equals the ``model_dump()`` of its ``router.openai_protocol`` model (tests check that).
class _ClientGone(Exception):
    pass


# -- the app -----------------------------------------------------------------------------------
class OpenAIApp:
    """The routes, over one ``RouterCore``. ``app`` is the ASGI application."""

    def __init__(self, core: RouterCore, config: RouterConfig):
        self.core = core
        limits = core.config.engine.limits
        self.max_body_bytes = int(config.max_http_body_mb * 2**20)
        self.max_media = limits.max_media_per_request
        self.default_max_tokens = min(config.default_max_tokens, limits.max_tokens)
        self.media = MediaResolver(config.media_url_allowlist, config.media_url_timeout_s, limits.max_media_bytes)
        self.created = int(time.time())
        self.is_stopping = False
        self.api_keys = tuple(config.api_keys)
        keyed = [Depends(self._check_api_key)]  # every route but /health (load balancers probe it)
        app = FastAPI(title="Tessera", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"], dependencies=keyed)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"], dependencies=keyed)
        app.add_api_route("/v1/models", self.list_models, methods=["GET"], dependencies=keyed)
        app.add_api_route("/v1/models/{model_id:path}", self.get_model, methods=["GET"], dependencies=keyed)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"], dependencies=keyed)
        app.add_exception_handler(HTTPError, _on_http_error)
        app.add_exception_handler(StarletteHTTPException, _on_starlette_error)  # unknown route, wrong method
        app.add_exception_handler(Exception, _on_unexpected)
        self.app = _CountResponses(app, core.metrics)

    async def _check_api_key(self, request: Request) -> None:
        if not is_authorized(request.headers.get(AUTH_HEADER), self.api_keys):
            raise HTTPError(401, UNAUTHENTICATED_MESSAGE, code="invalid_api_key")

    # -- routes -----------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        req = await self._parse(request, oa.ChatCompletionRequest)
        model = self._served_model(req.model)
        req.check_supported()
        turns, parts = req.chat_turns()
        if len(parts) > self.max_media:  # before fetching or decoding any of them
            raise HTTPError(400, f"{len(parts)} media items sent; at most {self.max_media} are allowed",
                            param="messages")
        media = [await self.media.resolve(part, param) for param, part in parts]
        rid = uuid.uuid4().hex
        inp = GenerateInput(messages=turns, media=media, sampling=req.sampling(self.default_max_tokens),
                            request_id=rid, chat_template=req.chat_template,
                            chat_template_kwargs=req.chat_template_kwargs)
        return await self._generate(request, inp, req, ChatShape(rid, model, self.core.tokenizer))

    async def completions(self, request: Request) -> Response:
        req = await self._parse(request, oa.CompletionRequest)
        model = self._served_model(req.model)
        req.check_supported()
        rid = uuid.uuid4().hex
        inp = GenerateInput(prompt=req.prompt_text(), sampling=req.sampling(self.default_max_tokens),
                            request_id=rid)
        return await self._generate(request, inp, req, TextShape(rid, model, self.core.tokenizer))

    async def list_models(self, request: Request) -> oa.ModelList:
        return oa.ModelList(data=[self._model_card()])

    async def get_model(self, request: Request, model_id: str) -> oa.ModelCard:
        self._served_model(model_id)
        return self._model_card()

    async def health(self, request: Request) -> dict:
        if self.is_stopping:
            raise HTTPError(503, "the server is shutting down", code="unavailable")
        missing = [pool for pool in self.core.controller.pools if not self.core.controller.ready_workers(pool)]
        if missing:
            raise HTTPError(503, f"no ready worker in pool(s) {', '.join(missing)}", code="unavailable")
        return {"status": "ok"}

    async def metrics(self, request: Request) -> Response:
        body, content_type = await self.core.metrics.render(request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": content_type})

    # -- helpers ----------------------------------------------------------------------------------
    async def _parse(self, request: Request, model: type[BaseModel]):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
        try:
            return model.model_validate_json(b"".join(chunks))
        except ValidationError as exc:
            raise oa.validation_error(exc) from None

    def _too_large(self) -> HTTPError:
        return HTTPError(413, f"the request body is over {self.max_body_bytes} bytes (router.max_http_body_mb)",
                         code="request_too_large")

    def _served_model(self, name: str) -> str:
        info = self.core.model_info()
        if name and name not in (info["model_name"], info["model_path"]):
            raise HTTPError(404, f"the model {name!r} does not exist; this server serves {info['model_name']!r}",
                            param="model", code="model_not_found")
        return info["model_name"]

    def _model_card(self) -> oa.ModelCard:
        info = self.core.model_info()
        return oa.ModelCard(id=info["model_name"], created=self.created, root=info["model_path"],
                            max_model_len=info["max_context_length"])

    async def _generate(self, request: Request, inp: GenerateInput, req: oa._GenerationRequest, shape) -> Response:
        streams: list[RequestStream] = []

        async def close_all() -> None:
            for s in streams:
                await s.aclose()

        try:
            streams += await self.core.submit_samples(inp, req.n)
        except InvalidRequestError as exc:
            await close_all()
            raise error_of(exc) from None
        except BaseException:
            await close_all()
            raise
        events = [aiter(s) for s in streams]
        try:
            # Wait for the first events before answering: a failure before them gets its status code.
            firsts = await _until_disconnect(request, asyncio.gather(*(anext(e, None) for e in events)))
            if any(f is None for f in firsts):
                raise HTTPError(503, "the request ended without a result", code="unavailable")
            if not req.stream:
                results = await _until_disconnect(request, asyncio.gather(
                    *(_collect(f, e) for f, e in zip(firsts, events))))
                await close_all()
                for _, final, _, _ in results:
                    if final.finish_reason == "error":
                        raise HTTPError(503, final.message or "the request failed", code="unavailable")
                return JSONResponse(shape.full(results, usage_of([r[1] for r in results])).model_dump(mode="json"))
        except _ClientGone:
            await close_all()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except (RouterError, InvalidRequestError) as exc:
            await close_all()
            raise error_of(exc) from None
        except BaseException:
            await close_all()
            raise
        return StreamingResponse(_sse_events(firsts, events, shape, req.include_usage, close_all),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(close_all))


async def _collect(first, events: AsyncIterator) -> tuple[str, FinalEvent, list[int], list | None]:
    """(text, final event, token ids, their logprobs or None)."""
    texts, token_ids, logprobs, event = [], [], None, first
    while not isinstance(event, FinalEvent):
        if event is None:
            raise HTTPError(503, "the request ended without a result", code="unavailable")
        texts.append(event.text)
        token_ids += event.token_ids
        if event.logprobs is not None:
            logprobs = (logprobs or []) + event.logprobs
        event = await anext(events, None)
    return "".join(texts), event, token_ids, logprobs


async def _sse_events(firsts: list, events: list[AsyncIterator], shape, include_usage: bool,
                      close_all) -> AsyncIterator[bytes]:
    """The SSE body: per choice an opening chunk (chat: the role), one chunk per text delta (the
    choices interleaved as their tokens come) and a last chunk with its finish reason; then the
    usage chunk if asked for, then ``[DONE]``. A failure of any choice ends the body with an error."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, event, it: AsyncIterator) -> None:
        try:
            while event is not None:
                await queue.put((index, event))
                if isinstance(event, FinalEvent):
                    return
                event = await anext(it, None)
            await queue.put((index, None))
        except (RouterError, InvalidRequestError) as exc:  # e.g. the deadline passed after the first token
            await queue.put((index, exc))

    pumps = [asyncio.create_task(pump(i, f, e)) for i, (f, e) in enumerate(zip(firsts, events))]
    try:
        for i in range(len(firsts)):
            opening = shape.opening(i)
            if opening is not None:
                yield _sse(opening)
        finals, running = [], len(firsts)
        while running:
            index, event = await queue.get()
            if isinstance(event, TokenEvent):
                if event.text or event.logprobs:
                    yield _sse(shape.text(event.text, None, event.token_ids, event.logprobs, index))
                continue
            running -= 1
            if isinstance(event, (RouterError, InvalidRequestError)):
                yield _sse(error_of(event).body())
                break
            if event is None or event.finish_reason == "error":
                message = event.message if event is not None else ""
                yield _sse(HTTPError(503, message or "the request failed", code="unavailable").body())
                break
            yield _sse(shape.text("", event.finish_reason, index=index))
            finals.append(event)
        else:
            if include_usage:
                yield _sse(shape.usage(usage_of(finals)))
    finally:
        for task in pumps:
            task.cancel()
        await close_all()
    yield b"data: [DONE]\n\n"


async def _until_disconnect(request: Request, work: Awaitable):
    """Await ``work``; raise ``_ClientGone`` (cancelling it) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise _ClientGone()
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t


class _CountResponses:
    """ASGI middleware: counts responses by endpoint and status (``tessera_http_responses_total``)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope.get("path", "")
            endpoint = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
            self.metrics.observe_http(endpoint, status)


# -- the server --------------------------------------------------------------------------------
class HttpServer:
    """uvicorn serving ``OpenAIApp`` on the running event loop (the core's), on ``router.host`` :
    ``router.http_port``; HTTPS only with ``router.tls_cert_file`` (``router/tls.py``). Signals
    are left to the owner (``router.service``)."""

    def __init__(self, core: RouterCore, config: RouterConfig):
        self.config = config
        self.api = OpenAIApp(core, config)
        self.port = 0
        self._server = None
        self._task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> str:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the process owner handles SIGINT / SIGTERM
                yield

        tls = ServerTLS.from_config(self.config)  # HTTPS (and client certificates) as gRPC has them
        host = self.config.host.strip("[]")
        sock = socket.create_server((host, self.config.http_port),
                                    family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=2048)
        self.port = sock.getsockname()[1]
        self._server = _Server(uvicorn.Config(self.api.app, log_config=None, log_level="warning",
                                              access_log=False, lifespan="off", timeout_graceful_shutdown=5,
                                              **(tls.uvicorn_options() if tls is not None else {})))
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="tessera-http")
        while not self._server.started:
            if self._task.done():
                sock.close()
                self._task.result()
                raise OSError(f"the HTTP server did not start on {self.address}")
            await asyncio.sleep(0.01)
        return self.address

    async def stop(self, grace_s: float = 5.0) -> None:
        """Health 503, stop accepting, let open responses end (the core aborts what runs), close."""
        self.api.is_stopping = True
        if self._server is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), grace_s + 10.0)
