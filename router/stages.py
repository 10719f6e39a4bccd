"""``StageRunner``: one attempt of a request through the pools, as ``RouterCore``'s driver runs it.

Disaggregated (``attempt``)::

    reserve (router.accounting) -> our token stream to that decode worker
    prefill:  PrefillWorker.prefill(request, embeddings ref, reservation)
              ├─ PrefillFirstToken ─▶ the first token to the client (push_token)
              └─ KVShipped
    decode:   DecodeWorker.generate: started with the prefill when the KV streams layer by layer
              (the decode worker takes the first token from the prefill worker; the request's
              sink holds decode tokens until ours has gone out), else after KVShipped; its
              tokens come over the token stream into the request's DecodeSink

``fork`` starts sample i > 0 of an ``n > 1`` request on sample 0's prompt KV; ``run_colocated``
is the one-worker path; ``release_attempt`` lets go of what an attempt holds (its prefill
stream drained, its decode reservation or running request aborted), so the next attempt (a retry
or a migration, ``router.retry``) or the cleanup starts from clean fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from cluster.config import ClusterConfig
from cluster.contracts import (DecodeRequest, EncodeItem, ForkUnavailableError, KVShipped, PrefillFirstToken,
                               PrefillRequest)
from cluster.controller import PoolWorker
from cluster.engine.block_manager import NoFreeBlocksError
from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.engine.inputs import PreparedRequest
from cluster.request_types import SamplingParams
from router import policies
from router.accounting import Accounting
from router.decode_sink import DecodeSink
from router.events import TokenEvent
from router.metrics import RouterMetrics
from router.request_stream import RequestState
from router.token_streams import TokenStreams
from router.worker_calls import WorkerCalls, as_coro, cancel

log = logging.getLogger(__name__)


class StageRunner:
    def __init__(self, config: ClusterConfig, accounting: Accounting, calls: WorkerCalls, streams: TokenStreams,
                 metrics: RouterMetrics, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.config, self.accounting, self.calls, self.streams = config, accounting, calls, streams
        self.metrics = metrics
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len

    def encode(self, st: RequestState, t: dict) -> None:
        """Dispatch the media to an encoder (not awaited: the ref goes straight to prefill)."""
        prepared = st.prepared
        items = [EncodeItem(d.content_hash, m.mime_type, m.data) for d, m in zip(prepared.media, st.media)]
        encoder = policies.pick_encoder(self.accounting.ready("encoder", st.avoid), [i.content_hash for i in items],
                                        self.config.router.encoder_affinity_max_queue)
        self.accounting.account(st, encoder, "inflight_tokens", len(items))
        self.accounting.account(st, encoder, "inflight_requests", 1)
        t.setdefault("encode", time.monotonic())
        st.encoder_worker = encoder
        st.encode_ref = encoder.actor.encode.remote(items)

    async def attempt(self, st: RequestState, t: dict, tokens: list[int], emit,
                       detok: IncrementalDetokenizer) -> tuple[str, str]:
        """Reserve -> prefill -> KV -> decode, continuing after ``tokens`` (those already sent:
        none on a first attempt; after a decode failure, the re-prefill covers prompt + tokens)."""
        plan, sampling = st.prepared.plan, st.prepared.sampling
        prompt = list(plan.prompt_token_ids) + tokens
        num_sent = len(tokens)  # (``tokens`` grows as this attempt streams)
        if tokens:
            sampling = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - len(tokens))
        num_prompt = len(prompt)

        # 1. decode reservation (overlaps encoding), and our token stream to that worker
        st.reservation = await self.accounting.reserve(st, num_prompt, sampling.max_tokens)
        await self.calls.call(st.decode_worker, self.streams.ensure(st.decode_worker))

        # 2. prefill: first token at once, then the KV ships
        prefill = st.prefill_worker = policies.pick_prefill(self.accounting.ready("prefill", st.avoid))
        self.accounting.account(st, prefill, "inflight_tokens", num_prompt)
        self.accounting.account(st, prefill, "inflight_requests", 1)
        # With layer-wise KV streaming decode starts with the prefill: the prefill worker hands
        # it the first token itself, and it admits the request the moment that and the KV
        # (streaming since the prompt's last chunk began) are there; its tokens wait in the sink
        # until ours, the first, has gone out.
        early = self.config.kv_transfer.stream_layers and sampling.max_tokens > 1
        request = PrefillRequest(st.request_id, prompt, list(plan.media_runs), sampling, self.eos_token_ids,
                                 [d.content_hash for d in st.prepared.media], plan.mrope_positions,
                                 plan.position_delta, num_sent, first_token_to_decode=early)
        t.setdefault("prefill", time.monotonic())
        st.prefill_gen = prefill.actor.prefill.options(num_returns="streaming").remote(
            request, st.encode_ref, st.reservation)
        decode = st.decode_worker
        num_forks = 0
        started = None
        try:
            if early:
                sink = self.open_sink(st, t, decode, detok, tokens, emit, hold=True)
                num_forks = self.num_forks(st, num_sent)
                started = decode.actor.generate.remote(DecodeRequest(
                    st.request_id, num_prompt, prompt, None, sampling, self.eos_token_ids, None, self.streams.stream_id,
                    plan.position_delta, num_sent, first_from_prefill=True), num_forks)
            first = await self.calls.next(st.prefill_gen, PrefillFirstToken, "prefill")
            st.prefill_has_token = True
            if "first" not in t:
                t["first"], t["prefill_s"] = time.monotonic(), first.prefill_s
            self.accounting.unaccount(st, "prefill", "encoder")  # their part is done

            finish = self.push_token(st, detok, first.token_id, tokens, emit, num_prompt, sampling, first.logprob)
            t.setdefault("ttft", time.monotonic())
            if finish is not None:  # done at the first token: cleanup drains the KV transfer, frees the blocks
                if started is not None:  # (and aborts the decode that started early)
                    started.future().add_done_callback(lambda f: f.cancelled() or f.exception())
                return finish

            # 3. decode: the tokens come over the token stream into the sink
            if early:
                sink.release()
            else:
                sink = self.open_sink(st, t, decode, detok, tokens, emit)
                num_forks = self.num_forks(st, num_sent)
                started = decode.actor.generate.remote(DecodeRequest(
                    st.request_id, num_prompt, prompt, first.token_id, sampling, self.eos_token_ids,
                    first.sampler_state, self.streams.stream_id, plan.position_delta, num_sent), num_forks)
            # (a failed transfer fails that generate too, its reservation released: report ours)
            shipped = await self.calls.next(st.prefill_gen, KVShipped, "prefill")
        except BaseException:
            if started is not None:  # nothing to wait for: the attempt's cleanup aborts it there
                started.future().add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        st.prefill_drained = True
        t["kv_s"] = t.get("kv_s", 0.0) + shipped.seconds
        t["decode"] = time.monotonic()
        await self.calls.call(decode, started)
        if num_forks:
            st.fork.resolve((decode, st.request_id, prompt))
        return await sink.done

    @staticmethod
    def num_forks(st: RequestState, num_sent: int) -> int:
        """How many other samples will fork from this attempt's prompt KV (none on a re-prefill)."""
        return st.fork.num_forks if st.fork is not None and not st.fork.source.done() and not num_sent else 0

    async def fork(self, st: RequestState, t: dict, tokens: list[int], emit,
                    detok: IncrementalDetokenizer) -> tuple[str, str] | None:
        """Sample i > 0 of an ``n > 1`` request: decode it on sample 0's prompt KV, on sample 0's
        decode worker (no prefill, no transfer; its first step there samples its first token).
        None when there is nothing to fork from or no room there: the caller prefills it."""
        source = await st.fork.source
        if source is None:
            return None
        decode, parent_id, prompt = source
        sampling = st.prepared.sampling
        st.decode_worker = decode
        self.accounting.account(st, decode, "reserved_blocks", self.accounting.blocks_for(len(prompt), sampling.max_tokens))
        self.accounting.account(st, decode, "inflight_requests", 1)
        try:
            await self.calls.call(decode, self.streams.ensure(decode))
            t["prefill"] = time.monotonic()  # the sink takes its first delta as the first token
            sink = self.open_sink(st, t, decode, detok, tokens, emit)
            await decode.actor.fork.remote(parent_id, DecodeRequest(
                st.request_id, len(prompt), prompt, None, sampling, self.eos_token_ids,
                stream_id=self.streams.stream_id, position_delta=st.prepared.plan.position_delta))
        except Exception as exc:  # noqa: BLE001 - gone, full or expired there: prefill this sample
            if not isinstance(exc, (ForkUnavailableError, NoFreeBlocksError)):
                st.avoid.add(decode.worker_id)
                log.warning("request %s: fork on %s failed (%s); prefilling it", st.request_id, decode.worker_id,
                            self.calls.failure(exc, decode))
            await self.release_attempt(st)
            t.pop("prefill", None)
            return None
        self.metrics.observe_fork()
        # Its prompt KV is on the decode worker now: a failure from here on migrates, as after a transfer.
        st.prefill_has_token = st.prefill_drained = True
        return await sink.done

    async def release_attempt(self, st: RequestState) -> None:
        """Let go of an attempt's prefill stream and decode reservation/stream (the encode ref
        and the admission slot stay); the next attempt starts from clean fields."""
        if st.prefill_gen is not None and not st.prefill_drained:
            # Before the first token, cancelling stops the prefill (the worker frees its
            # blocks); after it the worker ships the KV whatever we do, so just wait for that.
            if not st.prefill_has_token:
                cancel(st.prefill_gen)
            await self.drain(st.prefill_gen, self.config.kv_transfer.timeout_s + 10.0)
        if st.pending_reserve is not None:  # the driver stopped while a reserve() was in flight
            worker, ref = st.pending_reserve
            with contextlib.suppress(Exception):
                if await asyncio.wait_for(as_coro(ref), 30.0) is not None:
                    st.decode_worker = worker
        if st.sink is not None:
            self.streams.unregister(st.decode_worker.worker_id, st.request_id)
        if st.decode_worker is not None and not st.decode_done:
            with contextlib.suppress(Exception):  # (a dead worker fails this at once)
                await asyncio.wait_for(as_coro(st.decode_worker.actor.abort.remote(st.request_id)), 30.0)
        self.accounting.unaccount(st, "prefill", "decode")
        st.prefill_worker = st.prefill_gen = st.reservation = st.pending_reserve = None
        st.decode_worker = st.sink = None
        st.prefill_has_token = st.prefill_drained = st.decode_done = False

    async def run_colocated(self, st: RequestState, t: dict, tokens: list[int], emit) -> tuple[str, str]:
        """Colocated mode: one worker runs encode, prefill and decode; the first delta on its token
        stream holds the first token. Cleanup aborts it through ``decode_worker`` like a decode."""
        num_prompt = len(st.prepared.plan.prompt_token_ids)
        worker = policies.pick_prefill(self.accounting.ready("colocated"))
        self.accounting.account(st, worker, "inflight_tokens", num_prompt)
        self.accounting.account(st, worker, "inflight_requests", 1)
        st.decode_worker = worker
        await self.calls.call(worker, self.streams.ensure(worker))
        t["prefill"] = time.monotonic()
        detok = IncrementalDetokenizer(self.tokenizer, st.prepared.sampling.stop,
                                       min_tokens=st.prepared.sampling.min_tokens)
        sink = self.open_sink(st, t, worker, detok, tokens, emit)
        await self.calls.call(worker, worker.actor.generate.remote(st.prepared, self.streams.stream_id))
        return await sink.done

    def open_sink(self, st: RequestState, t: dict, worker: PoolWorker, detok: IncrementalDetokenizer,
                   tokens: list[int], emit, hold: bool = False) -> DecodeSink:
        """Where ``worker``'s outputs for this request go, registered before the request is sent
        (its first tokens may come before the call that started it returns); ``hold``: kept
        until ``release()``."""
        st.sink = DecodeSink(st, t, f"{worker.pool} worker {worker.worker_id}", detok, tokens, emit, hold)
        self.streams.register(worker.worker_id, st.request_id, st.sink)
        return st.sink

    def push_token(self, st: RequestState, detok: IncrementalDetokenizer, tok: int, tokens: list[int], emit,
                    num_prompt: int, sampling: SamplingParams, logprob=None) -> tuple[str, str] | None:
        """Emit the first token (sampled by prefill) with its text; the finish (reason, message) if
        it already ends the request (the token-level stops the decode worker checks for later ones)."""
        tokens.append(tok)
        detok.push([tok])
        if detok.stopped:
            finish = ("stop", "")
        else:
            finish = first_token_stop(sampling, tok, self.eos_token_ids, num_prompt, self.max_model_len)
        emit(TokenEvent([tok], detok.take(final=finish is not None), None if logprob is None else [logprob]))
        st.num_tokens_sent += 1
        return finish

    async def drain(self, gen, timeout_s: float) -> None:
        async def run():
            async for ref in gen:
                with contextlib.suppress(Exception):
                    await ref

        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(run(), timeout_s)


def first_token_stop(sampling: SamplingParams, tok: int, eos: tuple[int, ...], num_prompt: int,
                      max_model_len: int) -> tuple[str, str] | None:
    """``Request.check_stop`` for the token the prefill worker sampled."""
    if (not sampling.ignore_eos and tok in eos) or tok in sampling.stop_token_ids:
        return ("stop", "")
    if sampling.max_tokens <= 1 or num_prompt + 1 >= max_model_len:
        return ("length", "")
    return None


def forkable(prepared: PreparedRequest) -> bool:
    """A fork recomputes the prompt's last token on the decode worker, which has no media
    embeddings: that token must be text."""
    last = len(prepared.plan.prompt_token_ids) - 1
    return not any(o <= last < o + n for runs in prepared.plan.media_runs for o, n in runs)
