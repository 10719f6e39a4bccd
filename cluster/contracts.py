"""Typed messages exchanged between the router and the three worker pools.

These are the only objects that cross actor boundaries (Ray serialises them; no socket the project
opens ever carries them). All are frozen dataclasses so a message cannot change after it is sent.

A request's path through the cluster, and the message at each hop:

    router --EncodeItem[]--> EncoderWorker.encode            -> list[Tensor [num_tokens, hidden]]
    router --(request_id, num_prompt_tokens, max_tokens)--> DecodeWorker.reserve -> Reservation
    router --PrefillRequest + embeddings ref + Reservation--> PrefillWorker.prefill
           <-- PrefillFirstToken (at once), then KVShipped (after the KV landed on the decode worker)
    prefill --(request_id, sender id)--> Reservation.decode_actor.kv_expect -> pair info
    prefill --(request_id, KVTicket)--> decode_actor.kv_receive   (the KV, cluster.kv_transfer)
    prefill --(request_id, token, sampler state)--> decode_actor.kv_first_token
           (only for DecodeRequest.first_from_prefill: decode started with the prefill)
    router --DecodeRequest--> DecodeWorker.generate          -> returns once the request runs
    router --(parent id, DecodeRequest)--> DecodeWorker.fork  -> sample i > 0 of an ``n > 1`` request
           runs on the parent's prompt KV (no prefill, no transfer), or ForkUnavailableError
    router <== StepOutputs (every running request's new tokens, one message per engine step) ==
               decode / colocated worker, over the router's token stream (``cluster.step_stream``)

Every actor answers ``ready() -> WorkerInfo`` once its model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cluster.request_types import SamplingParams


@dataclass(frozen=True)
class EncodeItem:
    """One media item for an encoder worker."""

    content_hash: str  # hex digest of (media bytes + preprocessing params); the encoder cache key
    mime_type: str  # e.g. "image/png", "audio/wav"; picks the decoder and the encoder tower
    data: bytes  # the raw media bytes as the client sent them


@dataclass(frozen=True)
class PrefillRequest:
    """What a prefill worker needs to run one prompt (the media embeddings travel separately)."""

    request_id: str  # unique per request across the cluster
    prompt_token_ids: list[int]  # the expanded prompt: placeholders already repeated to each item's token count
    # per media item, in item order: the (token index, tokens) runs of prompt_token_ids its
    # embedding rows fill, in order (TokenPlan.media_runs; one run per item but a Qwen3-VL video)
    media_runs: list[tuple[tuple[int, int], ...]]
    sampling: SamplingParams  # validated sampling params (the first token is sampled with these)
    eos_token_ids: tuple[int, ...]  # the model's EOS ids (first token may already be EOS)
    # content hash of each media item (DecodedMedia.content_hash, hex), in item order: the prefix
    # cache keys KV blocks by them; empty (unknown): no KV block from the first media item on is reused
    media_hashes: list[str] = field(default_factory=list)
    # M-RoPE models (Qwen-VL, models/mrope.py): [3, n] int64 positions of the first n prompt
    # tokens as the router planned them (n < len(prompt) on a re-prefill after migration), and
    # the delta of every later token (position = index + delta). None / 0: positions are indices.
    mrope_positions: torch.Tensor | None = None
    position_delta: int = 0
    # a re-prefill after migration: the last num_sent_tokens of prompt_token_ids are outputs the
    # client has (penalties and min_tokens count them as output)
    num_sent_tokens: int = 0
    # decode was started with this prefill (DecodeRequest.first_from_prefill): also hand the
    # first token to the reservation's decode worker, straight from here
    first_token_to_decode: bool = False


@dataclass(frozen=True)
class Reservation:
    """KV blocks a decode worker set aside for one request (prompt + max_tokens, capped at max_model_len)."""

    worker_id: str  # the decode worker holding the blocks
    request_id: str  # the request the blocks belong to
    block_ids: list[int]  # physical block ids in the decode worker's paged KV cache, in logical order
    # the decode worker's actor handle: the prefill worker calls it (kv_expect, kv_receive,
    # kv_first_token) for this request's KV and first token; the router never relays those
    decode_actor: Any = None


@dataclass(frozen=True)
class PrefillFirstToken:
    """Yielded by PrefillWorker.prefill as soon as the first token is sampled (before any KV moves)."""

    token_id: int  # the first generated token
    prefill_s: float  # seconds from the worker accepting the request to the token being sampled (queue + compute)
    # Seeded non-greedy sampling only: the request's torch.Generator state after the first sample
    # (CPU uint8 bytes); pass it on in DecodeRequest.sampler_state so decode continues the same stream.
    sampler_state: bytes | None = None
    # SamplingParams.logprobs set: the first token's (logprob, [[token_id, logprob], ...] top alternatives)
    logprob: tuple | None = None


@dataclass(frozen=True)
class KVShipped:
    """Yielded by PrefillWorker.prefill once the request's KV is in the decode worker's reserved blocks."""

    num_bytes: int  # bytes of KV payload sent (all layers, K and V, prompt tokens only)
    seconds: float  # wall seconds the transfer took on the prefill side (connect + send + ack)


@dataclass(frozen=True)
class DecodeRequest:
    """Starts decoding a request whose KV has landed in its reservation."""

    request_id: str  # same id as the reservation
    num_prompt_tokens: int  # prompt length in tokens (= tokens whose KV is in the reserved blocks)
    prompt_token_ids: list[int]  # the prompt (only its length matters to decode; kept for logging/debugging)
    # the token prefill sampled; decode starts by feeding it. None in a fork: the decode worker
    # recomputes the prompt's last position and samples the first token itself
    first_token: int | None
    sampling: SamplingParams  # validated sampling params
    eos_token_ids: tuple[int, ...]  # the model's EOS ids
    sampler_state: bytes | None = None  # PrefillFirstToken.sampler_state (seeded sampling); None otherwise
    # the router's token stream on this worker (``open_step_stream``): where the outputs go
    stream_id: str = ""
    # M-RoPE models: PrefillRequest.position_delta; decode token i sits at position i + delta
    position_delta: int = 0
    num_sent_tokens: int = 0  # PrefillRequest.num_sent_tokens
    # started before the first token exists (layer-wise KV streaming): the prefill worker hands
    # it over (``DecodeWorker.kv_first_token``); first_token and sampler_state are None here
    first_from_prefill: bool = False


class ForkUnavailableError(RuntimeError):
    """``DecodeWorker.fork``: the parent's prompt KV is no longer held for forks (every fork was
    taken, it expired, or the parent's first token ended it); the router prefills the sample."""


@dataclass(frozen=True)
class WorkerInfo:
    """Identity of a ready worker actor."""

    worker_id: str  # unique id, e.g. "decode-0"
    pool: str  # "encoder" | "prefill" | "decode"
    node_id: str  # Ray node id the actor runs on
    pid: int  # OS process id of the actor
    address: str | None = None  # host/IP of the node, if known
