"""Front-door request preparation shared by the router and the in-process engine.

``InputPreparer.prepare`` validates everything that can be checked without a worker (sampling
params, media bytes, placeholder/media count, context length after expansion) and returns the
token plan; any problem raises ``InvalidRequestError`` with a message meant for the user.
``InputPreparer.render_chat`` turns chat turns into that prompt, making sure the client's text
adds no special token to it.

Every size a client controls is bounded before it costs anything: chat messages and parts (the
constants below), the request id, the prompt's characters (no more than the context length could
hold, before tokenizing), media count and bytes (``MediaLimits``), sampling lists
(``SamplingParams.validate``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cluster.request_types import InvalidRequestError, SamplingParams
from models.processor import DecodedMedia, MediaError, MediaLimits, MultimodalProcessor, TokenPlan
from cluster.request_types import MediaInput


MAX_CHAT_MESSAGES = 256  # turns in one chat request
MAX_CHAT_PARTS = 64  # content parts in one turn
MAX_REQUEST_ID_CHARS = 128
# A role is a name (system, user, assistant, tool, ...): templates paste it into the prompt as is.
_ROLE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


def check_request_id(request_id: str) -> None:
    """Ids show up in logs, metrics and Abort calls: 1..128 printable ASCII characters, no spaces."""
    if not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS or not all(" " < c <= "~" for c in request_id):
        raise InvalidRequestError(f"request_id must be 1..{MAX_REQUEST_ID_CHARS} printable ASCII characters "
                                  f"without spaces")


def check_chat_size(num_messages: int, most_parts: int) -> None:
    """A chat's shape, checked before anything walks it: ``most_parts`` is its longest message's."""
    if num_messages > MAX_CHAT_MESSAGES:
        raise InvalidRequestError(f"{num_messages} chat messages sent; at most {MAX_CHAT_MESSAGES} are allowed")
    if most_parts > MAX_CHAT_PARTS:
        raise InvalidRequestError(f"a chat message has {most_parts} content parts; at most {MAX_CHAT_PARTS} "
                                  f"are allowed")


@dataclass
class PreparedRequest:
    request_id: str
    plan: TokenPlan
    media: list[DecodedMedia]  # in prompt order
    sampling: SamplingParams


class InputPreparer:
    def __init__(self, processor: MultimodalProcessor, limits: MediaLimits, max_model_len: int,
                 max_tokens_limit: int):
        self.processor = processor
        self.limits = limits
        self.max_model_len = max_model_len
        self.max_tokens_limit = max_tokens_limit
        self.vocab_size = processor.config.get_text_config().vocab_size
        # No token covers more characters than the longest one in the vocabulary (byte-level BPE
        # and SentencePiece pieces are at least as long as the text they stand for), so a longer
        # prompt cannot fit: rejected before the tokenizer spends seconds on megabytes of text.
        longest_token = max((len(t) for t in processor.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = max_model_len * max(longest_token, 1)

    def prepare(self, request_id: str, prompt: str, media: list[MediaInput],
                sampling: SamplingParams) -> PreparedRequest:
        sampling.validate(self.max_tokens_limit, self.vocab_size)
        if not prompt.strip():
            raise InvalidRequestError("the prompt is empty")
        if len(prompt) > self.max_prompt_chars:
            raise InvalidRequestError(f"the prompt is {len(prompt)} characters; at most {self.max_prompt_chars} "
                                      f"can fit the context length of {self.max_model_len} tokens")
        if not prompt.isascii():
            try:
                prompt.encode()
            except UnicodeEncodeError:  # a lone surrogate: the tokenizer would raise a TypeError
                raise InvalidRequestError("the prompt is not valid Unicode text (it has a lone surrogate)") from None
        if len(media) > self.limits.max_media_per_request:
            raise InvalidRequestError(
                f"{len(media)} media items sent; at most {self.limits.max_media_per_request} are allowed")
        decoded = []
        for i, item in enumerate(media):
            try:
                decoded.append(self.processor.decode_media(item, self.limits))
            except MediaError as exc:
                raise InvalidRequestError(f"media item {i}: {exc}") from None
        try:
            plan = self.processor.build_token_plan(prompt, decoded)
        except MediaError as exc:
            raise InvalidRequestError(str(exc)) from None
        n = len(plan.prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        media_tokens = sum(plan.media_lengths)
        if self.limits.max_media_tokens and media_tokens > self.limits.max_media_tokens:
            raise InvalidRequestError(
                f"the media items become {media_tokens} prompt tokens "
                f"({', '.join(f'{m.modality} {m.num_tokens}' for m in decoded)}); the limit is "
                f"{self.limits.max_media_tokens} per request: send fewer or smaller media")
        if n + 1 > self.max_model_len:
            of_media = f" ({media_tokens} of them for {len(decoded)} media items)" if decoded else ""
            raise InvalidRequestError(
                f"the prompt is {n} tokens after media expansion{of_media}; the context length is "
                f"{self.max_model_len}, and at least one token must be left to generate")
        # prompt + max_tokens may exceed the context: as in vLLM, the output then stops at the
        # context length (finish reason "length") rather than the request being rejected.
        return PreparedRequest(request_id, plan, decoded, sampling)

    def render_chat(self, turns: list[dict]) -> str:
        """Chat turns (``{"role", "content": [{"type": "text", "text"} | {"type": "image" | "video" | "audio"}]}``)
        -> the prompt, by the model's chat template. Chat text is the client's: it must not add a
        special token to the prompt (a typed "<image>" would outnumber the media, "<|im_start|>"
        forge a turn). Checked on the rendered prompt against the same turns with every text
        replaced by "x", which also catches a token split over two parts ("<|AU" + "DIO|>").
        The chat's size is the caller's to bound first (``check_chat_size``)."""
        for turn in turns:
            if not _ROLE.fullmatch(turn["role"]):
                raise InvalidRequestError(f"chat role {turn['role'][:40]!r} is not a role name (system, user, "
                                          f"assistant, ...)")
        neutral = [{**t, "content": [{**p, "text": "x" if p["text"] else ""} if p["type"] == "text" else p
                                     for p in t["content"]]} for t in turns]
        try:
            prompt = self.processor.apply_chat_template(turns)
            skeleton = self.processor.apply_chat_template(neutral)
        except Exception as exc:  # noqa: BLE001 - template errors are the client's input
            raise InvalidRequestError(f"cannot apply the chat template: {str(exc)[:200]}") from None
        typed = [t for t in self.processor.special_tokens if prompt.count(t) != skeleton.count(t)]
        if typed:
            for placeholder, _ in self.processor.placeholders.values():
                if placeholder in typed:
                    raise InvalidRequestError(f"chat text must not contain the placeholder {placeholder!r}: "
                                              f"send media as media parts")
            raise InvalidRequestError(f"chat text must not contain special tokens such as {typed[0]!r}")
        return prompt
