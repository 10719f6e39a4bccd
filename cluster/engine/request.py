"""One request's state inside an engine (colocated, prefill or decode worker).

Lifecycle::

    WAITING ──admit (blocks allocated)──▶ RUNNING ──stop condition──▶ FINISHED_{STOPPED,LENGTH}
       ▲                                     │ └──abort / error──────▶ FINISHED_{ABORTED,ERROR}
       └──────preempted (blocks freed)───────┘

Every step processes ``token_ids(num_computed_tokens, num_computed_tokens + n)`` for each
scheduled request: a prefill chunk (n up to the token budget) or one decode token (n = 1) are the
same operation. When a step reaches the end of the tokens a token is sampled and appended.
A request that arrives with its KV already computed elsewhere (disaggregated decode) starts in
RUNNING with ``num_computed_tokens = len(prompt)`` and its first token in ``output_token_ids``.
With prefix caching, admission may start it at ``num_computed_tokens = num_cached_tokens > 0``:
its first blocks are shared, already computed blocks of earlier requests with the same prefix.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from cluster.engine.sampling import History, SamplerState
from cluster.request_types import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(frozen=True)
class MediaSlot:
    """Where one media item's embeddings go in the prompt."""

    offset: int  # index of its first placeholder token in prompt_token_ids
    embeddings: torch.Tensor  # [num_tokens, lm_hidden], on the LM's device/dtype
    # hex digest of the media bytes + preprocessing params (DecodedMedia.content_hash): what the
    # prefix cache tells two images apart by; "" (unknown): no KV block from this item on is shared
    content_hash: str = ""

    @property
    def length(self) -> int:
        return self.embeddings.shape[0]


def media_slots(runs: list[tuple[tuple[int, int], ...]], embeddings: list[torch.Tensor], hashes: list[str],
                device: torch.device | str | None = None) -> list[MediaSlot]:
    """One slot per run of each item (``TokenPlan.media_runs``), the item's embedding rows dealt
    out in order; ValueError when the counts disagree. A run of a multi-run item is hashed as
    ``hash:k``: the prefix cache tells the runs of one video apart."""
    if not len(runs) == len(embeddings) == len(hashes):
        raise ValueError(f"{len(embeddings)} embeddings and {len(hashes)} hashes for {len(runs)} media items")
    slots = []
    for item_runs, emb, content_hash in zip(runs, embeddings, hashes):
        if sum(n for _, n in item_runs) != emb.shape[0]:
            raise ValueError(f"an item of {emb.shape[0]} embedding rows placed in runs of "
                             f"{[n for _, n in item_runs]} tokens")
        emb, row = emb.to(device) if device is not None else emb, 0
        for k, (offset, n) in enumerate(item_runs):
            key = f"{content_hash}:{k}" if content_hash and len(item_runs) > 1 else content_hash
            slots.append(MediaSlot(offset, emb[row: row + n], key))
            row += n
    return slots


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    media: list[MediaSlot] = field(default_factory=list)
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    # params.logprobs set: one TokenLogprob per token this worker sampled (appended by the runner)
    output_logprobs: list = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in this worker's cache
    num_cached_tokens: int = 0  # of those, taken from the prefix cache at (the last) admission
    # M-RoPE models: [3, n] positions of the first n prompt tokens (the prompt as the router
    # planned it; a re-prefill's prompt may be longer) and the delta of every later token
    # (position = index + delta; models/mrope.py). None: positions are the token indices.
    mrope_positions: torch.Tensor | None = None
    position_delta: int = 0
    # outputs of an earlier attempt at the end of prompt_token_ids (a re-prefill after a
    # migration): penalties and min_tokens count them as output
    num_sent_tokens: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # chain hash per full block (block_hash.py)
    num_registered_blocks: int = 0  # leading block_ids offered to the prefix cache so far
    status: RequestStatus = RequestStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_preemptions: int = 0
    sampler: SamplerState = field(init=False)
    grammar: object = None  # SamplingParams.structured_output: its GrammarState on this worker (the runner's)

    def __post_init__(self):
        self.sampler = SamplerState.create(self.sampling)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_client_prompt_tokens(self) -> int:
        """The client's prompt: prompt_token_ids without the outputs a re-prefill carries."""
        return len(self.prompt_token_ids) - self.num_sent_tokens

    def outputs_so_far(self) -> list[int]:
        """Every output token, those sent before a migration (at the end of the prompt) included."""
        return self.prompt_token_ids[self.num_client_prompt_tokens:] + self.output_token_ids

    def history(self) -> History | None:
        """The sampler's view of this request's tokens where its params need one (penalties,
        ``min_tokens``): O(length), only for those requests."""
        p = self.sampling
        if not p.has_penalties and len(self.output_token_ids) + self.num_sent_tokens >= p.min_tokens:
            return None
        stop = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        return History(self.prompt_token_ids[:self.num_client_prompt_tokens], self.outputs_so_far(), stop)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + outputs, without building the whole list (a decode
        step asks for one token: O(1), not O(length))."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n: end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV must still be computed before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """Token-level stop conditions after the last appended token (stop *strings* are the
        detokenizer's: they need text)."""
        last = self.output_token_ids[-1]
        p = self.sampling
        if self.grammar is not None and self.grammar.done:  # the structured output is complete
            return RequestStatus.FINISHED_STOPPED
        if not p.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if last in p.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= p.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
