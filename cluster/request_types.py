"""What a client's request carries, torch-free: the gRPC client (``tessera status|scale|generate
--server``) imports this and nothing heavier.

``SamplingParams`` follow vLLM's semantics (see ``cluster.engine.sampling`` for the sampler);
``MediaInput`` is one media item as the client sent it; ``InvalidRequestError`` is what any check
of a request raises (gRPC INVALID_ARGUMENT / HTTP 400).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs limit, vLLM's default max_logprobs)
# Below this temperature a request samples greedily, as in vLLM (its _SAMPLING_EPS): logits / 1e-45
# is +-inf in float32 and the softmax NaN, which would fail the worker's whole sampling step.
MIN_SAMPLING_TEMPERATURE = 1e-5


class InvalidRequestError(ValueError):
    """A request a client sent is malformed; maps to gRPC INVALID_ARGUMENT / HTTP 400."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # vLLM's penalties (greedy rows too): presence / frequency subtract per output token seen
    # (once / per occurrence); repetition divides a seen token's positive logit (multiplies a
    # negative one), seen in the prompt or the output; 0 / 0 / 1 are off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # sampled rows: drop tokens below min_p x the top token's probability
    min_tokens: int = 0  # no EOS or stop token id (and no stop string) before this many tokens
    # the log-probability of each output token and of the `logprobs` most likely alternatives, from
    # the model's float32 log-softmax before any penalty or temperature (vLLM's default); None: off
    logprobs: int | None = None
    # constrain the output (cluster/engine/structured.py): (kind, value), kind one of "json_schema"
    # (value: the schema as JSON), "json_object", "regex", "choice" (a JSON list of strings),
    # "grammar" (Lark); None: free text
    structured_output: tuple[str, str] | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def validate(self, max_tokens_limit: int, vocab_size: int) -> "SamplingParams":
        """Raise ``InvalidRequestError`` with a message a user can act on; return self."""

        def bad(msg: str):
            raise InvalidRequestError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.max_tokens > max_tokens_limit:
            bad(f"max_tokens={self.max_tokens} exceeds the limit of {max_tokens_limit}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0 or self.top_k > vocab_size:
            bad(f"top_k must be in [0, {vocab_size}] (0 disables it), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            bad(f"seed must be in [0, 2^63), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                bad(f"{name} must be in [-2, 2], got {value!r}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be a finite number > 0 (1 disables it), got {self.repetition_penalty!r}")
        if not math.isfinite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            bad(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad(f"logprobs must be in [0, {MAX_LOGPROBS}] top alternatives, got {self.logprobs!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_STRING_CHARS:
                bad(f"stop strings must be 1..{MAX_STOP_STRING_CHARS} characters long")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad(f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                bad(f"stop token id {t} is outside the vocabulary [0, {vocab_size})")
        return self


MODALITIES = ("image", "video", "audio")
# magic bytes -> the FFmpeg demuxer that opens them (MP4/MOV; WebM/MKV)
VIDEO_CONTAINERS = (
    (lambda head: head[4:8] == b"ftyp", "mov"),
    (lambda head: head[:4] == b"\x1a\x45\xdf\xa3", "matroska"),
)


def video_container(head: bytes) -> str | None:
    """The demuxer of a video's first bytes (``VIDEO_CONTAINERS``), or None."""
    return next((name for match, name in VIDEO_CONTAINERS if match(head)), None)


@dataclass(frozen=True)
class MediaInput:
    """One media item as the client sent it."""

    data: bytes
    mime_type: str = ""  # "image/png", "audio/wav", "video/mp4", ...; empty: guess from the bytes

    @property
    def modality(self) -> str:
        for kind in MODALITIES:
            if self.mime_type.startswith(kind + "/"):
                return kind
        head = self.data[:12]
        if video_container(head):
            return "video"
        if head.startswith((b"RIFF", b"fLaC", b"ID3", b"OggS")) and b"WEBP" not in head:
            return "audio"
        return "image"
