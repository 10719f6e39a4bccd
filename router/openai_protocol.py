"""The OpenAI-compatible API's wire types (pydantic), and their translation to ``GenerateInput``.

Requests tolerate keys they do not know (OpenAI clients send many optional ones) but reject the
few features that would otherwise be silently wrong (``UNSUPPORTED``: tools, logit_bias, n > 1,
...). Chat messages become the transport-neutral chat turns of ``GenerateInput``
(``{"type": "media", "index": i}`` parts), which ``RouterCore`` renders with the model's own chat
template exactly as for gRPC ``messages``; the media parts come back in order, still to be
resolved to bytes (``router.media_urls``).

Every client-controlled size is bounded: the body (``router.max_http_body_mb``, in the server),
messages per request, parts per message, ``n``; stop strings, media count and bytes, and
max_tokens by the same checks as gRPC (``SamplingParams.validate``, ``InputPreparer``).
"""

from __future__ import annotations

import time
import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.engine.inputs import MAX_CHAT_MESSAGES as MAX_MESSAGES  # the same bounds as gRPC chats
from cluster.engine.inputs import MAX_CHAT_PARTS as MAX_PARTS_PER_MESSAGE
from cluster.request_types import MAX_LOGPROBS, SamplingParams

MAX_N = 16  # choices per request (samples of one prompt: RouterCore.submit_samples)
MAX_STOP_LIST = 64  # parse-time bound; SamplingParams enforces the real limit (16)


class HTTPError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
             503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# -- requests ----------------------------------------------------------------------------------
class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown keys are kept in model_extra and ignored


class TextPart(_Tolerant):
    type: Literal["text"]
    text: str


class ImageURL(_Tolerant):
    url: str  # data:image/...;base64,... or an http(s) URL (only with router.media_url_allowlist)
    detail: str | None = None  # accepted, ignored: the model's own processor sets the resolution


class ImageURLPart(_Tolerant):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Tolerant):
    url: str  # data:video/mp4;base64,... (or webm, x-matroska) or an allow-listed http(s) URL


class VideoURLPart(_Tolerant):
    """vLLM's extension for video models (Qwen-VL): ``{"type": "video_url", "video_url": {"url"}}``."""

    type: Literal["video_url"]
    video_url: VideoURL


class InputAudio(_Tolerant):
    data: str  # base64
    format: Literal["wav", "mp3", "flac"]


class InputAudioPart(_Tolerant):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImageURLPart | VideoURLPart | InputAudioPart, Field(discriminator="type")]
MediaPart = ImageURLPart | VideoURLPart | InputAudioPart


class ChatMessage(_Tolerant):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS_PER_MESSAGE)] | None = None


class StreamOptions(_Tolerant):
    include_usage: bool = False


class _GenerationRequest(_Tolerant):
    """What chat and text completions share: the model, sampling, streaming."""

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default: 1.0
    top_p: float | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_LIST)] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM-compatible extensions (benchmark clients send them)
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_LIST)] | None = None
    presence_penalty: float | None = None  # OpenAI's; the rest are vLLM's
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int = 0
    # structured outputs: OpenAI's response_format ({"type": "text" | "json_object" | "json_schema",
    # "json_schema": {"name", "schema", "strict"}}) or one of vLLM's guided_* extensions
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(max_length=256)] | None = None
    guided_grammar: str | None = None

    # key -> the values that are fine (absent or these); anything else is a feature we do not have.
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
        "logit_bias": (None, {}),
        "best_of": (None, 1),
        "echo": (None, False), "suffix": (None, ""),
        "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    }

    def check_supported(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise HTTPError(400, f"n must be in [1, {MAX_N}] choices per request, got {self.n}", param="n")
        for key, fine in self.UNSUPPORTED.items():
            value = (self.model_extra or {}).get(key)
            if value not in fine:
                raise HTTPError(400, f"`{key}` is not supported by this server", param=key, code="unsupported")

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """OpenAI defaults (temperature 1, top_p 1); limits are checked by ``SamplingParams.validate``."""
        max_tokens = self._max_tokens()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, seed=self.seed, ignore_eos=self.ignore_eos, stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()), presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=self.min_p or 0.0, min_tokens=self.min_tokens, logprobs=self._logprobs(),
            structured_output=self._structured_output())

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> int | None:
        return None

    def _structured_output(self) -> tuple[str, str] | None:
        """(kind, value) of SamplingParams.structured_output; compiled and checked by the core."""
        given = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type") if isinstance(rf, dict) else None
            if kind == "json_object":
                given.append(("json_object", ""))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict):
                    raise HTTPError(400, "response_format json_schema needs json_schema.schema (an object)",
                                    param="response_format")
                given.append(("json_schema", json.dumps(schema)))
            elif kind != "text":
                raise HTTPError(400, "response_format.type must be text, json_object or json_schema",
                                param="response_format")
        if self.guided_json is not None:
            given.append(("json_schema", self.guided_json if isinstance(self.guided_json, str)
                          else json.dumps(self.guided_json)))
        if self.guided_regex is not None:
            given.append(("regex", self.guided_regex))
        if self.guided_choice is not None:
            given.append(("choice", json.dumps(self.guided_choice)))
        if self.guided_grammar is not None:
            given.append(("grammar", self.guided_grammar))
        if len(given) > 1:
            raise HTTPError(400, "set one of response_format (json) and guided_json / guided_regex / guided_choice / "
                                 "guided_grammar", param="response_format")
        return given[0] if given else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = None  # the newer name of max_tokens; wins when both are set
    # vLLM's extensions: this request's own Jinja template (router.trust_request_chat_template) and
    # extra template variables (e.g. {"enable_thinking": false}); bounded by InputPreparer
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise HTTPError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                            param="top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_turns(self) -> tuple[list[dict[str, Any]], list[tuple[str, MediaPart]]]:
        """``GenerateInput.messages`` (media as ``{"type": "media", "index": i}``) and the media
        parts in conversation order (media i is the i-th one), each with its path for errors."""
        turns, media = [], []
        for i, message in enumerate(self.messages):
            content = message.content
            if content is None:
                content = []
            elif isinstance(content, str):
                content = [TextPart(type="text", text=content)]
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                else:
                    parts.append({"type": "media", "index": len(media)})
                    media.append((f"messages.{i}.content.{j}", part))
            role = "system" if message.role == "developer" else message.role  # OpenAI's newer name
            turns.append({"role": role, "content": parts})
        return turns, media


class CompletionRequest(_GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]  # one prompt per request
    logprobs: int | None = None  # top alternatives per token (the legacy API's shape)

    def _logprobs(self) -> int | None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise HTTPError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")
        return self.logprobs

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# -- responses ---------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Response(BaseModel):
    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None  # {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]  # {"role": "assistant", "content": ""} first, then {"content": "..."}, then {}
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None  # only in the last chunk, with stream_options.include_usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None  # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None  # always set, except on streamed chunks (then only the last, if asked)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tessera"
    root: str  # the model folder or hub id
    max_model_len: int  # context length the cluster serves (vLLM's field name)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_BRANCH_NAMES = {"str", "int", "float", "bool", "none", "list", "dict"}


def validation_error(exc) -> HTTPError:
    """A pydantic ``ValidationError`` -> 400 naming the first bad field (dotted, as OpenAI does)."""
    errors = exc.errors(include_url=False)
    # Of a union's failed branches, the one that got deepest says most (a bad part, not "not a str").
    err = max(reversed(errors), key=lambda e: len(e.get("loc", ())))
    loc: list[str] = []
    for p in map(str, err.get("loc", ())):
        if "[" in p or p in _BRANCH_NAMES or (loc and loc[-1] == p):  # union branch names, tag repeats
            continue
        loc.append(p)
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    return HTTPError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")
