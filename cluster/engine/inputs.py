"""Front-door request preparation shared by the router and the in-process engine.

``InputPreparer.prepare`` validates everything that can be checked without a worker (sampling
params, media bytes, placeholder/media count, context length after expansion) and returns the
token plan; any problem raises ``InvalidRequestError`` with a message meant for the user.
``InputPreparer.render_chat`` turns chat turns into that prompt's token ids by the chat template
(the model folder's, ``engine.chat_template``, or a request's own), the client's text encoded as
the text it is: a typed "<s>" or "<|im_start|>" is characters, never a control token, and a typed
placeholder never stands for media (transformers' ``sanitize_control_tokens``).

Every size a client controls is bounded before it costs anything: chat messages and parts (the
constants below), the request id, the prompt's characters (no more than the context length could
hold, before tokenizing), media count and bytes (``MediaLimits``), sampling lists
(``SamplingParams.validate``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from cluster.config import MAX_CHAT_TEMPLATE_CHARS
from cluster.engine.structured import GrammarError, check_structured_output
from cluster.request_types import InvalidRequestError, MediaInput, SamplingParams
from models.processor import DecodedMedia, MediaError, MediaLimits, MultimodalProcessor, TokenPlan


MAX_CHAT_MESSAGES = 256  # turns in one chat request
MAX_CHAT_PARTS = 64  # content parts in one turn
MAX_REQUEST_ID_CHARS = 128
MAX_TEMPLATE_KWARGS = 32  # chat_template_kwargs entries
MAX_TEMPLATE_KWARGS_BYTES = 16 * 1024  # chat_template_kwargs as JSON
# apply_chat_template's own arguments: chat_template_kwargs may not set them
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "return_dict", "return_tensors", "sanitize_control_tokens",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "padding", "truncation", "max_length"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
NO_CHAT_TEMPLATE = ("this model's folder has no chat template: start the server with --chat-template FILE "
                    "(engine.chat_template), or send a raw prompt (/v1/completions, GenerateRequest.prompt)")


def check_template_kwargs(kwargs: dict) -> dict:
    """A request's ``chat_template_kwargs``: a few variables for the template, JSON-sized."""
    if not isinstance(kwargs, dict):
        raise InvalidRequestError("chat_template_kwargs must be an object")
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise InvalidRequestError(f"chat_template_kwargs has {len(kwargs)} entries; at most {MAX_TEMPLATE_KWARGS}")
    for key in kwargs:
        if not isinstance(key, str) or not _IDENTIFIER.fullmatch(key):
            raise InvalidRequestError(f"chat_template_kwargs key {str(key)[:40]!r} is not an identifier")
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise InvalidRequestError(f"chat_template_kwargs may not set {key!r} (the server sets it)")
    try:
        size = len(json.dumps(kwargs))
    except (TypeError, ValueError):
        raise InvalidRequestError("chat_template_kwargs must hold JSON values") from None
    if size > MAX_TEMPLATE_KWARGS_BYTES:
        raise InvalidRequestError(f"chat_template_kwargs is {size} bytes as JSON; at most {MAX_TEMPLATE_KWARGS_BYTES}")
    return kwargs
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
                 max_tokens_limit: int, chat_template: str | None = None, trust_request_chat_template: bool = False):
        self.processor = processor
        self.chat_template = chat_template or processor.chat_template  # None: chat is refused (NO_CHAT_TEMPLATE)
        self.trust_request_chat_template = trust_request_chat_template
        self.limits = limits
        self.max_model_len = max_model_len
        self.max_tokens_limit = max_tokens_limit
        self.vocab_size = processor.config.get_text_config().vocab_size
        # No token covers more characters than the longest one in the vocabulary (byte-level BPE
        # and SentencePiece pieces are at least as long as the text they stand for), so a longer
        # prompt cannot fit: rejected before the tokenizer spends seconds on megabytes of text.
        longest_token = max((len(t) for t in processor.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = max_model_len * max(longest_token, 1)

    def prepare(self, request_id: str, prompt: str | list[int], media: list[MediaInput],
                sampling: SamplingParams) -> PreparedRequest:
        """``prompt``: raw text with the model's placeholders, or token ids (``render_chat``)."""
        sampling.validate(self.max_tokens_limit, self.vocab_size)
        if sampling.structured_output is not None:
            try:
                check_structured_output(sampling.structured_output, self.processor.tokenizer, self.vocab_size)
            except GrammarError as exc:
                raise InvalidRequestError(str(exc)) from None
        if isinstance(prompt, str):
            self._check_prompt_text(prompt)
        elif not all(0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
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

    def _check_prompt_text(self, prompt: str) -> None:
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

    def render_chat(self, turns: list[dict], chat_template: str | None = None,
                    template_kwargs: dict | None = None) -> list[int]:
        """Chat turns (``{"role", "content": [{"type": "text", "text"} | {"type": "image" | "video" | "audio"}]}``)
        -> the prompt's token ids, by ``chat_template`` (a request's own, when the server trusts
        them), else the server's. Chat text is the client's and is encoded as text: control
        tokens in it (the tokenizer's special tokens, the added tokens the template writes) stay
        characters, so "What does <s> do?" is served and a typed "<image>" or "<|im_start|>" is
        neither a placeholder nor a forged turn. Text parts that only form a control token where
        the template joins them ("<|im_" + "start|>") are refused: the ids are checked against
        the same turns with every text "x". The chat's size is the caller's to bound first
        (``check_chat_size``)."""
        for turn in turns:
            if not _ROLE.fullmatch(turn["role"]):
                raise InvalidRequestError(f"chat role {turn['role'][:40]!r} is not a role name (system, user, "
                                          f"assistant, ...)")
        if chat_template is not None:
            if not self.trust_request_chat_template:
                raise InvalidRequestError("this server does not accept a request's own chat_template "
                                          "(router.trust_request_chat_template is off)")
            if len(chat_template) > MAX_CHAT_TEMPLATE_CHARS:
                raise InvalidRequestError(f"chat_template is {len(chat_template)} characters; at most "
                                          f"{MAX_CHAT_TEMPLATE_CHARS}")
        template = chat_template or self.chat_template
        if template is None:
            raise InvalidRequestError(NO_CHAT_TEMPLATE)
        kwargs = check_template_kwargs(template_kwargs) if template_kwargs else {}
        chars = sum(len(p["text"]) for t in turns for p in t["content"] if p["type"] == "text")
        if chars > self.max_prompt_chars:
            raise InvalidRequestError(f"the chat text is {chars} characters; at most {self.max_prompt_chars} can "
                                      f"fit the context length of {self.max_model_len} tokens")
        # Only text parts side by side can join into a token the sanitizer did not see in either part;
        # without such a pair the second tokenization is skipped (most chats: one text part a turn).
        joinable = any(a["type"] == b["type"] == "text" for t in turns for a, b in zip(t["content"], t["content"][1:]))
        try:
            ids = self.processor.tokenize_chat(turns, template, **kwargs)
            if not joinable:
                return ids
            neutral = [{**t, "content": [{**p, "text": "x" if p["text"] else ""} if p["type"] == "text" else p
                                         for p in t["content"]]} for t in turns]
            skeleton = self.processor.tokenize_chat(neutral, template, **kwargs)
        except Exception as exc:  # noqa: BLE001 - template errors are the client's input
            raise InvalidRequestError(f"cannot apply the chat template: {str(exc)[:200]}") from None
        control = self.processor.control_token_ids
        joined = {t for t in control if ids.count(t) != skeleton.count(t)}
        if joined:
            name = self.processor.tokenizer.convert_ids_to_tokens(min(joined))
            raise InvalidRequestError(f"chat text parts join into the control token {name!r} where the template "
                                      f"puts them together; send that text as one part")
        return ids
