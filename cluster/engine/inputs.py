"""Front-door request preparation shared by the router and the in-process engine.

``InputPreparer.prepare`` validates everything that can be checked without a worker (sampling
params, media bytes, placeholder/media count, context length after expansion) and returns the
token plan; any problem raises ``InvalidRequestError`` with a message meant for the user.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.engine.sampling import InvalidRequestError, SamplingParams
from models.processor import DecodedMedia, MediaError, MediaInput, MediaLimits, MultimodalProcessor, TokenPlan


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

    def prepare(self, request_id: str, prompt: str, media: list[MediaInput],
                sampling: SamplingParams) -> PreparedRequest:
        sampling.validate(self.max_tokens_limit, self.vocab_size)
        if len(media) > self.limits.max_media_per_request:
            raise InvalidRequestError(
                f"{len(media)} media items sent; at most {self.limits.max_media_per_request} are allowed")
        try:
            decoded = [self.processor.decode_media(m, self.limits) for m in media]
            plan = self.processor.build_token_plan(prompt, decoded)
        except MediaError as exc:
            raise InvalidRequestError(str(exc)) from None
        n = len(plan.prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        if n + 1 > self.max_model_len:
            raise InvalidRequestError(
                f"the prompt is {n} tokens after media expansion; the context length is {self.max_model_len}")
        # prompt + max_tokens may exceed the context: as in vLLM, the output then stops at the
        # context length (finish reason "length") rather than the request being rejected.
        return PreparedRequest(request_id, plan, decoded, sampling)
