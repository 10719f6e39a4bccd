"""What goes in and out of ``RouterCore``, independent of the front end (gRPC now, HTTP next):
the request, the streamed events, and the errors (each maps to one gRPC status / HTTP code)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.request_types import MediaInput, SamplingParams


# -- errors (each maps to one gRPC status / HTTP code) ------------------------------------------
class RouterError(Exception):
    """Base of the failures a request can end with before its first token."""


class OverloadedError(RouterError):
    """Admission queue full or no capacity: RESOURCE_EXHAUSTED / HTTP 429."""


class WorkerUnavailableError(RouterError):
    """No ready worker in a pool, or a worker failed: UNAVAILABLE / HTTP 503."""


class DeadlineExceededError(RouterError):
    """The request's deadline passed: DEADLINE_EXCEEDED / HTTP 504."""


# -- request / events --------------------------------------------------------------------------
@dataclass
class GenerateInput:
    """One request as any front end hands it to the core."""

    prompt: str | None = None  # raw prompt with placeholders; or `messages`
    # Chat turns: [{"role": str, "content": [{"type": "text", "text": str} | {"type": "media", "index": int}]}]
    messages: list[dict[str, Any]] | None = None
    media: list[MediaInput] = field(default_factory=list)  # in placeholder order (prompt) / by index (messages)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    chat_template: str | None = None  # messages: the request's own template (router.trust_request_chat_template)
    chat_template_kwargs: dict[str, Any] | None = None  # messages: extra variables for the template
    request_id: str = ""  # empty: the core picks one
    timeout_s: float | None = None  # client deadline, seconds from now; None: the router's default


@dataclass(frozen=True)
class TokenEvent:
    token_ids: list[int]  # new tokens, in order (the first event holds exactly one)
    text: str  # UTF-8 text delta (may be empty while held back)
    logprobs: list | None = None  # SamplingParams.logprobs set: [logprob, [[token_id, logprob], ...]] per token


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # after placeholder expansion
    prompt_media_tokens: int  # of prompt_tokens, media embeddings
    completion_tokens: int  # tokens streamed, including a stopping token


@dataclass(frozen=True)
class StageTimings:
    """Seconds, router clock, from the request's arrival unless said otherwise (see the proto)."""

    queue_s: float = 0.0  # admission queue (after validation / media decoding)
    # encode dispatch -> embeddings on the prefill worker (the prefill call starts when Ray has
    # resolved its embeddings argument): first token back - prefill_s - encode dispatch
    encode_s: float = 0.0
    prefill_s: float = 0.0  # the prefill worker's own: request accepted -> first token (queue + compute)
    kv_transfer_s: float = 0.0  # as reported by the prefill worker (handshake + send + ack)
    decode_s: float = 0.0  # decode dispatch -> last token
    ttft_s: float = 0.0
    e2e_s: float = 0.0


@dataclass(frozen=True)
class FinalEvent:
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    message: str  # detail for abort / error
    usage: Usage
    timings: StageTimings


Event = TokenEvent | FinalEvent
