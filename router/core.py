"""``RouterCore``: drives one request through the pools. Transport-neutral: the gRPC servicer and
the OpenAI-compatible HTTP API only translate to and from the types below. Every request's outcome
and stage timings are recorded once, here, in ``self.metrics`` (``router.metrics``).

A request's life in the router::

    submit()   validate + prepare (InputPreparer, in a thread: media decoding is CPU work)
               └─ InvalidRequestError ───────────────────────────────▶ INVALID_ARGUMENT
    _drive()   admission (bounded in-flight + bounded queue) ── full ──▶ RESOURCE_EXHAUSTED
               encode:   EncoderWorker.encode(items) ─ ObjectRef, never fetched here ──┐
               reserve:  DecodeWorker.reserve(...) (most free blocks first; waits when  │
                         every worker is full)                                          │
               prefill:  PrefillWorker.prefill(req, embeddings_ref ◀──────────────────┘, reservation)
                         ├─ PrefillFirstToken ─▶ first chunk to the client (TTFT)
                         └─ KVShipped (KV is in the reserved decode blocks)
               decode:   DecodeWorker.generate(req), started with the prefill when the KV streams
                         layer by layer (it takes the first token from the prefill worker and
                         runs once the KV has landed), else after KVShipped; its tokens come over the router's token
                         stream to that worker (one message per engine step for all requests,
                         router.token_streams) into the request's DecodeSink: detokenize, stop
                         strings, events to the client
               (n > 1:   samples 1..n-1 skip reserve and prefill: DecodeWorker.fork on sample 0's
                         prompt KV, see _fork; prefilled themselves when that is not possible)
               final:    finish reason, usage, per-stage timings
    cleanup    on abort / client cancel / deadline / failure, every stage lets go: before the
               first token the encode task and the prefill stream are cancelled; after it the
               KV transfer is let finish (drained, so no KV lands late); then the decode worker
               aborts the request (frees its reservation, or stops it between two steps).

Types in and out (``GenerateInput``, ``TokenEvent``, ``FinalEvent``, errors) are in
``router.events``; admission control is ``router.admission``; routing is ``router.policies``;
per-worker load accounting and decode reservations are ``router.accounting``; worker calls and
what their Ray errors mean are ``router.worker_calls``.

Each request runs as one *driver* task feeding an event queue; ``RequestStream`` (what
``submit`` returns) reads it. Cancelling the driver (Abort, deadline, client gone) is how every
stop path enters the same cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from typing import Any

from cluster.config import ClusterConfig
from cluster.contracts import (DecodeRequest, EncodeItem, ForkUnavailableError, KVShipped, PrefillFirstToken,
                               PrefillRequest)
from cluster.autoscaler import LatencyWindow
from cluster.controller import Controller, PoolWorker
from cluster.engine.block_manager import NoFreeBlocksError
from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.engine.inputs import InputPreparer, PreparedRequest, check_chat_size, check_request_id
from cluster.request_types import InvalidRequestError, MediaInput, SamplingParams
from models.processor import MultimodalProcessor
from router import policies
from router.accounting import Accounting
from router.admission import Admission
from router.decode_sink import DecodeSink
from router.events import (DeadlineExceededError, Event, FinalEvent, GenerateInput, OverloadedError, RouterError,
                           StageTimings, TokenEvent, Usage, WorkerUnavailableError)
from router.metrics import RouterMetrics
from router.request_stream import END, Failure, ForkGroup, RequestState, RequestStream
from router.token_streams import TokenStreams
from router.worker_calls import WorkerCalls, as_coro, cancel

__all__ = ["Admission", "DeadlineExceededError", "Event", "FinalEvent", "GenerateInput", "OverloadedError",
           "RequestStream", "RouterCore", "RouterError", "StageTimings", "TokenEvent", "Usage",
           "WorkerUnavailableError"]

log = logging.getLogger(__name__)


# -- the core ----------------------------------------------------------------------------------
class RouterCore:
    def __init__(self, config: ClusterConfig, controller: Controller, model_dir: str):
        from transformers import AutoConfig

        from cluster.engine.setup import eos_token_ids, resolve_max_model_len

        self.config = config
        self.controller = controller
        self.model_dir = str(model_dir)
        self.hf_config = AutoConfig.from_pretrained(model_dir)
        self.processor = MultimodalProcessor(model_dir, self.hf_config)
        self.tokenizer = self.processor.tokenizer
        self.eos_token_ids = tuple(sorted(eos_token_ids(model_dir, self.tokenizer)))
        # The context length the cluster can serve: the smallest KV cache of the LM workers.
        caches = [w.kv_blocks_total for p in ("prefill", "decode", "colocated")
                  for w in controller.ready_workers(p)
                  if w.kv_blocks_total]
        num_blocks = min(caches) if caches else 1 << 30
        self.max_model_len = resolve_max_model_len(config.engine, self.hf_config.get_text_config(), num_blocks)
        limits = config.engine.limits
        self.preparer = InputPreparer(self.processor, limits.media(), self.max_model_len, limits.max_tokens,
                                      chat_template=config.engine.chat_template or None,
                                      trust_request_chat_template=config.router.trust_request_chat_template)
        self.admission = Admission(config.router.max_inflight_requests, config.router.max_queued_requests)
        self.metrics = RouterMetrics(controller, self.admission)  # every request's outcome and timings
        self.latency = LatencyWindow()  # recent TTFT / TPOT, read by the autoscaler
        self._requests: dict[str, RequestState] = {}
        self._closing: set[str] = set()  # ids whose stages are still letting go (cleanup running)
        self._background: set[asyncio.Task] = set()
        self.calls = WorkerCalls(controller)  # worker calls, their failures as router errors
        self.accounting = Accounting(config, controller, self.calls, self.max_model_len)  # load + reservations
        self.streams = TokenStreams()  # one token stream per decode / colocated worker

    # -- public API --------------------------------------------------------------------------
    async def submit(self, inp: GenerateInput) -> RequestStream:
        """Validate and start a request. Raises ``InvalidRequestError`` (nothing was scheduled)."""
        return (await self.submit_samples(inp, 1))[0]

    async def submit_samples(self, inp: GenerateInput, n: int) -> list[RequestStream]:
        """``n`` samples of one prompt (OpenAI's ``n``), prepared once, sample i with seed + i as
        vLLM defines it, ids ``<id>-<i>`` when n > 1. Disaggregated, one prefill and one KV
        transfer serve them all: the other samples fork from sample 0's prompt KV on its decode
        worker (``_fork``). Raises ``InvalidRequestError`` (nothing was scheduled)."""
        arrival = time.monotonic()
        base = inp.request_id or uuid.uuid4().hex
        ids = [base] if n == 1 else [f"{base}-{i}" for i in range(n)]
        try:
            for rid in ids:
                self._check_new_id(rid)
            prepared, media = await asyncio.to_thread(self._prepare, ids[0], inp)  # tokenizing: off the loop
            for rid in ids:  # a same-id request may have started during preparation
                self._check_new_id(rid)
        except InvalidRequestError as exc:
            self.metrics.observe_request(None, exc)
            raise
        timeout = self.config.router.request_timeout_s
        if inp.timeout_s is not None:
            timeout = min(timeout, max(inp.timeout_s, 0.0))
        group = ForkGroup(n - 1) if n > 1 and self.config.mode != "colocated" and _forkable(prepared) else None
        seed = prepared.sampling.seed
        streams = []
        for i, rid in enumerate(ids):
            sample = prepared if i == 0 else dataclasses.replace(prepared, request_id=rid, sampling=dataclasses.replace(
                prepared.sampling, seed=None if seed is None else (seed + i) % 2**63))
            st = RequestState(rid, sample, media, arrival + timeout, arrival, time.monotonic(), fork=group,
                              fork_index=i)
            self._requests[rid] = st
            st.driver = asyncio.create_task(self._drive(st), name=f"request-{rid}")
            streams.append(RequestStream(self, st))
        return streams

    def _check_new_id(self, request_id: str) -> None:
        check_request_id(request_id)
        if request_id in self._requests or request_id in self._closing:
            raise InvalidRequestError(f"request id {request_id!r} is already running")

    def abort(self, request_id: str) -> bool:
        st = self._requests.get(request_id)
        if st is None or st.finished:
            return False
        self._stop(st, "abort")
        return True

    def model_info(self) -> dict[str, Any]:
        proc = self.processor
        modality = proc.modality
        limits = self.config.engine.limits
        audio_tps = 0.0
        if modality == "audio":
            audio_tps = proc.audio_tokens(proc.sampling_rate * 30) / 30.0
        model_path = self.config.engine.model or self.model_dir
        return {
            "model_name": _model_name(self.config.engine.model, self.model_dir),
            "model_path": model_path,
            "architecture": (getattr(self.hf_config, "architectures", None) or [""])[0],
            "max_context_length": self.max_model_len,
            "modalities": ["text"] + list(proc.modalities),
            "image_placeholder": proc.placeholders.get("image", ("", 0))[0],
            "audio_placeholder": proc.placeholders.get("audio", ("", 0))[0],
            "video_placeholder": proc.placeholders.get("video", ("", 0))[0],
            "num_tokens_per_image": proc.tokens_per_image if modality == "image" else 0,
            "audio_tokens_per_second": audio_tps,
            "dtype": self.config.engine.dtype,
            "vocab_size": self.preparer.vocab_size,
            "eos_token_ids": list(self.eos_token_ids),
            "limits": {"max_media_per_request": limits.max_media_per_request,
                       "max_image_pixels": limits.max_image_pixels,
                       "max_audio_seconds": limits.max_audio_seconds,
                       "max_video_seconds": limits.max_video_seconds,
                       "max_video_frames": limits.max_video_frames,
                       "max_media_tokens": limits.max_media_tokens},
        }

    async def cluster_status(self) -> dict[str, Any]:
        await self.controller.refresh_loads()
        status = self.controller.status(self.config.kv_transfer.transport)
        status["router"] = {"num_inflight": self.admission.num_inflight, "num_queued": self.admission.num_queued,
                            "num_requests": len(self._requests)}
        return status

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Abort every running request and wait (up to ``grace_s``) for their cleanup."""
        for st in list(self._requests.values()):
            self._stop(st, "abort")
        tasks = [st.driver for st in self._requests.values() if st.driver] + list(self._background)
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        self.streams.close()

    @property
    def num_running(self) -> int:
        return len(self._requests)

    @property
    def is_idle(self) -> bool:
        """No request running and no cleanup in flight (every stage has let go)."""
        return not self._requests and not self._closing and not self._background

    # -- preparation -------------------------------------------------------------------------
    def _prepare(self, request_id: str, inp: GenerateInput) -> tuple[PreparedRequest, list[MediaInput]]:
        prompt, media = self._render(inp)
        return self.preparer.prepare(request_id, prompt, media, inp.sampling), media

    def _render(self, inp: GenerateInput) -> tuple[str | list[int], list[MediaInput]]:
        """The prompt (raw text, or a chat's token ids) and the media in placeholder order."""
        if (inp.prompt is None) == (inp.messages is None):
            raise InvalidRequestError("set exactly one of `prompt` and `messages`")
        if inp.prompt is not None:
            return inp.prompt, list(inp.media)
        if not inp.messages:
            raise InvalidRequestError("`messages` is empty")
        check_chat_size(len(inp.messages), max(len(t.get("content", ())) for t in inp.messages))
        used: list[int] = []
        turns = []
        for turn in inp.messages:
            role = turn.get("role") or ""
            if not role:
                raise InvalidRequestError("every chat message needs a role")
            parts = []
            for part in turn.get("content", []):
                if part.get("type") == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                    continue
                index = int(part.get("index", -1))
                if not 0 <= index < len(inp.media):
                    raise InvalidRequestError(f"media_index {index} is out of range: {len(inp.media)} media sent")
                if index in used:
                    raise InvalidRequestError(f"media_index {index} is used twice; each media item goes in once")
                used.append(index)
                parts.append({"type": inp.media[index].modality})
            turns.append({"role": role, "content": parts})
        if len(used) != len(inp.media):
            unused = sorted(set(range(len(inp.media))) - set(used))
            raise InvalidRequestError(f"media item(s) {unused} are not referenced by any message")
        prompt = self.preparer.render_chat(turns, inp.chat_template, inp.chat_template_kwargs)
        return prompt, [inp.media[i] for i in used]

    # -- stopping ----------------------------------------------------------------------------
    def _stop(self, st: RequestState, reason: str) -> None:
        if st.finished or st.stop_reason:
            return
        st.stop_reason = reason
        if st.driver is not None and not st.driver.done():
            # NOTE: on the next loop turn, not now: a driver task cancelled before its first step
            # never runs ``_drive`` at all (no final event, no cleanup); tasks start in FIFO order,
            # so by then it has started and the cancel lands inside its try.
            asyncio.get_running_loop().call_soon(st.driver.cancel)

    # -- the driver --------------------------------------------------------------------------
    async def _drive(self, st: RequestState) -> None:
        emit = st.queue.put_nowait
        admitted = False
        tokens: list[int] = []
        t = {"arrival": st.arrival}
        finish: tuple[str, str] | None = None
        failure: BaseException | None = None  # what the client gets instead of a final event

        def fail(exc: BaseException) -> None:
            nonlocal failure
            failure = exc
            emit(Failure(exc))

        try:
            await self.admission.acquire()
            admitted = True
            t["dispatch"] = time.monotonic()
            finish = await self._run_stages(st, t, tokens, emit)
        except asyncio.CancelledError:
            reason = st.stop_reason or "cancelled"
            if reason == "deadline":  # a non-OK status even after tokens, as gRPC deadlines are
                where = "after" if st.num_tokens_sent else "before"
                fail(DeadlineExceededError(f"deadline exceeded {where} the first token"))
            elif reason == "abort":
                finish = ("abort", "aborted by request")
        except (RouterError, InvalidRequestError) as exc:  # (after tokens too: a non-OK status ends the stream)
            fail(exc)
        except Exception as exc:  # noqa: BLE001 - a worker failure of any kind
            err = self.calls.failure(exc)
            log.warning("request %s failed: %s", st.request_id, err)
            fail(err)
        finally:
            st.finished = True
            if st.fork is not None and st.fork_index == 0:
                st.fork.resolve(None)  # (no-op once the forks have their source)
            final = self._final(st, finish, tokens, t) if finish is not None else None
            if final is not None:
                emit(final)
            emit(END)
            self.metrics.observe_request(final, failure, st.stop_reason)
            if final is not None:
                self.latency.record_final(final)
            self._requests.pop(st.request_id, None)
            self._closing.add(st.request_id)
            self._spawn(self._cleanup(st, admitted))

    async def _run_stages(self, st: RequestState, t: dict, tokens: list[int], emit) -> tuple[str, str]:
        if self.config.mode == "colocated":
            return await self._run_colocated(st, t, tokens, emit)
        detok = IncrementalDetokenizer(self.tokenizer, st.prepared.sampling.stop,
                                       min_tokens=st.prepared.sampling.min_tokens)
        forking = st.fork is not None and st.fork_index > 0
        while True:
            try:
                if forking:
                    forking = False
                    finish = await self._fork(st, t, tokens, emit, detok)
                    if finish is not None:
                        return finish
                if st.prepared.media and st.encode_ref is None:
                    self._encode(st, t)
                return await self._attempt(st, t, tokens, emit, detok)
            except (asyncio.CancelledError, InvalidRequestError, OverloadedError):
                raise
            except Exception as exc:  # noqa: BLE001 - a worker failed: retry, migrate or fail
                if st.fork is not None and st.fork_index == 0 and tokens:
                    st.fork.resolve(None)  # a migration prefills prompt + tokens: not the samples' prompt
                await self._retry(st, t, exc, tokens)

    def _encode(self, st: RequestState, t: dict) -> None:
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

    async def _attempt(self, st: RequestState, t: dict, tokens: list[int], emit,
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
                sink = self._open_sink(st, t, decode, detok, tokens, emit, hold=True)
                num_forks = self._num_forks(st, num_sent)
                started = decode.actor.generate.remote(DecodeRequest(
                    st.request_id, num_prompt, prompt, None, sampling, self.eos_token_ids, None, self.streams.stream_id,
                    plan.position_delta, num_sent, first_from_prefill=True), num_forks)
            first = await self.calls.next(st.prefill_gen, PrefillFirstToken, "prefill")
            st.prefill_has_token = True
            if "first" not in t:
                t["first"], t["prefill_s"] = time.monotonic(), first.prefill_s
            self.accounting.unaccount(st, "prefill", "encoder")  # their part is done

            finish = self._push_token(st, detok, first.token_id, tokens, emit, num_prompt, sampling, first.logprob)
            t.setdefault("ttft", time.monotonic())
            if finish is not None:  # done at the first token: cleanup drains the KV transfer, frees the blocks
                if started is not None:  # (and aborts the decode that started early)
                    started.future().add_done_callback(lambda f: f.cancelled() or f.exception())
                return finish

            # 3. decode: the tokens come over the token stream into the sink
            if early:
                sink.release()
            else:
                sink = self._open_sink(st, t, decode, detok, tokens, emit)
                num_forks = self._num_forks(st, num_sent)
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
    def _num_forks(st: RequestState, num_sent: int) -> int:
        """How many other samples will fork from this attempt's prompt KV (none on a re-prefill)."""
        return st.fork.num_forks if st.fork is not None and not st.fork.source.done() and not num_sent else 0

    async def _fork(self, st: RequestState, t: dict, tokens: list[int], emit,
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
            sink = self._open_sink(st, t, decode, detok, tokens, emit)
            await decode.actor.fork.remote(parent_id, DecodeRequest(
                st.request_id, len(prompt), prompt, None, sampling, self.eos_token_ids,
                stream_id=self.streams.stream_id, position_delta=st.prepared.plan.position_delta))
        except Exception as exc:  # noqa: BLE001 - gone, full or expired there: prefill this sample
            if not isinstance(exc, (ForkUnavailableError, NoFreeBlocksError)):
                st.avoid.add(decode.worker_id)
                log.warning("request %s: fork on %s failed (%s); prefilling it", st.request_id, decode.worker_id,
                            self.calls.failure(exc, decode))
            await self._release_attempt(st)
            t.pop("prefill", None)
            return None
        self.metrics.observe_fork()
        # Its prompt KV is on the decode worker now: a failure from here on migrates, as after a transfer.
        st.prefill_has_token = st.prefill_drained = True
        return await sink.done

    # -- worker failures: retry, migrate, or fail --------------------------------------------
    async def _retry(self, st: RequestState, t: dict, exc: BaseException, tokens: list[int]) -> None:
        """A worker failed the request. Which stage failed decides what happens; ``exc`` (as the
        client's error) is raised when that stage has no retry left:

        * the encoder (its result is an error): encode once more, on another encoder;
        * prefill, before its first token: prefill again, on another prefill worker;
        * later (KV transfer, decode; tokens were streamed): migrate, i.e. reserve on another
          decode worker and re-prefill prompt + the tokens sent so far, which continues greedy
          output exactly where it stopped.
        Whatever the failed attempt held is let go first (its reservation, a KV transfer)."""
        if st.prefill_gen is None and not st.prefill_has_token:  # no decode worker could reserve (all tried)
            raise self.calls.failure(exc)
        stage, worker, error = await self._failed_stage(st, exc)
        cfg = self.config.router
        allowed = {"encoder": cfg.max_encoder_retries, "prefill": cfg.max_prefill_retries,
                   "decode": cfg.max_decode_migrations}[stage]
        done = st.num_retries.get(stage, 0)
        if done >= allowed:
            raise error
        st.num_retries[stage] = done + 1
        if worker is not None:
            st.avoid.add(worker.worker_id)
        log.warning("request %s: %s worker %s failed (%s); %s", st.request_id, stage,
                    worker.worker_id if worker else "?", error,
                    "migrating" if stage == "decode" else f"retrying on another {stage} worker")
        self.metrics.observe_retry(stage)
        await self._release_attempt(st)
        if stage == "encoder":
            self.accounting.unaccount(st, "encoder")
            self._encode(st, t)

    async def _failed_stage(self, st: RequestState, exc: BaseException) -> tuple[str, PoolWorker | None, Exception]:
        """(stage, worker, client error) of a failed attempt."""
        if not st.prefill_has_token and st.encode_ref is not None:
            try:
                await st.encode_ref  # (only on this failure path: fetches the embeddings once)
            except Exception as enc_exc:  # noqa: BLE001 - the encoder failed the request
                return "encoder", st.encoder_worker, self.calls.failure(enc_exc, st.encoder_worker)
        if not st.prefill_has_token:
            return "prefill", st.prefill_worker, self.calls.failure(exc, st.prefill_worker)
        worker = st.decode_worker if st.prefill_drained else None  # a failed transfer: either side
        return "decode", worker, self.calls.failure(exc, worker)

    async def _release_attempt(self, st: RequestState) -> None:
        """Let go of an attempt's prefill stream and decode reservation/stream (the encode ref
        and the admission slot stay); the next attempt starts from clean fields."""
        if st.prefill_gen is not None and not st.prefill_drained:
            # Before the first token, cancelling stops the prefill (the worker frees its
            # blocks); after it the worker ships the KV whatever we do, so just wait for that.
            if not st.prefill_has_token:
                cancel(st.prefill_gen)
            await self._drain(st.prefill_gen, self.config.kv_transfer.timeout_s + 10.0)
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

    async def _run_colocated(self, st: RequestState, t: dict, tokens: list[int], emit) -> tuple[str, str]:
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
        sink = self._open_sink(st, t, worker, detok, tokens, emit)
        await self.calls.call(worker, worker.actor.generate.remote(st.prepared, self.streams.stream_id))
        return await sink.done

    def _open_sink(self, st: RequestState, t: dict, worker: PoolWorker, detok: IncrementalDetokenizer,
                   tokens: list[int], emit, hold: bool = False) -> DecodeSink:
        """Where ``worker``'s outputs for this request go, registered before the request is sent
        (its first tokens may come before the call that started it returns); ``hold``: kept
        until ``release()``."""
        st.sink = DecodeSink(st, t, f"{worker.pool} worker {worker.worker_id}", detok, tokens, emit, hold)
        self.streams.register(worker.worker_id, st.request_id, st.sink)
        return st.sink

    def _push_token(self, st: RequestState, detok: IncrementalDetokenizer, tok: int, tokens: list[int], emit,
                    num_prompt: int, sampling: SamplingParams, logprob=None) -> tuple[str, str] | None:
        """Emit the first token (sampled by prefill) with its text; the finish (reason, message) if
        it already ends the request (the token-level stops the decode worker checks for later ones)."""
        tokens.append(tok)
        detok.push([tok])
        if detok.stopped:
            finish = ("stop", "")
        else:
            finish = _first_token_stop(sampling, tok, self.eos_token_ids, num_prompt, self.max_model_len)
        emit(TokenEvent([tok], detok.take(final=finish is not None), None if logprob is None else [logprob]))
        st.num_tokens_sent += 1
        return finish

    def _final(self, st: RequestState, finish: tuple[str, str], tokens: list[int], t: dict) -> FinalEvent:
        now = time.monotonic()
        arrival = t["arrival"]
        ttft = t.get("ttft", now) - arrival
        encode_s = 0.0
        if "encode" in t and "first" in t:
            encode_s = max(0.0, t["first"] - t.get("prefill_s", 0.0) - t["encode"])
        timings = StageTimings(
            queue_s=t.get("dispatch", now) - st.prepared_at,
            encode_s=encode_s,
            prefill_s=t.get("prefill_s", 0.0),
            kv_transfer_s=t.get("kv_s", 0.0),
            decode_s=(t.get("last", now) - t["decode"]) if "decode" in t else 0.0,
            ttft_s=ttft if tokens else 0.0,
            e2e_s=now - arrival,
        )
        plan = st.prepared.plan
        usage = Usage(len(plan.prompt_token_ids), sum(plan.media_lengths), len(tokens))
        return FinalEvent(finish[0], finish[1], usage, timings)

    # -- stages' helpers ---------------------------------------------------------------------
    # -- cleanup -----------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cleanup(self, st: RequestState, admitted: bool) -> None:
        """Let every stage go of the request. Order matters: the prefill stream must be over (its
        KV transfer finished or aborted) before the decode reservation is freed, or late KV could
        land in blocks that another request owns by then."""
        try:
            if st.encode_ref is not None and st.num_tokens_sent == 0:
                cancel(st.encode_ref)
            await self._release_attempt(st)
        except Exception as exc:  # noqa: BLE001 - cleanup must not raise
            log.warning("cleanup of request %s: %s", st.request_id, exc)
        finally:
            for worker, attr, amount in st.accounted:
                setattr(worker, attr, getattr(worker, attr) - amount)
            st.accounted.clear()
            if admitted:
                self.admission.release()
            self._closing.discard(st.request_id)
            self.accounting.notify_freed()

    async def _drain(self, gen, timeout_s: float) -> None:
        async def run():
            async for ref in gen:
                with contextlib.suppress(Exception):
                    await ref

        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(run(), timeout_s)


def _first_token_stop(sampling: SamplingParams, tok: int, eos: tuple[int, ...], num_prompt: int,
                      max_model_len: int) -> tuple[str, str] | None:
    """``Request.check_stop`` for the token the prefill worker sampled."""
    if (not sampling.ignore_eos and tok in eos) or tok in sampling.stop_token_ids:
        return ("stop", "")
    if sampling.max_tokens <= 1 or num_prompt + 1 >= max_model_len:
        return ("length", "")
    return None


def _forkable(prepared: PreparedRequest) -> bool:
    """A fork recomputes the prompt's last token on the decode worker, which has no media
    embeddings: that token must be text."""
    last = len(prepared.plan.prompt_token_ids) - 1
    return not any(o <= last < o + n for runs in prepared.plan.media_runs for o, n in runs)


def _model_name(model: str, model_dir: str) -> str:
    """A hub id as is; a folder by its name; the built-in default as tessera-tiny-<arch>."""
    from pathlib import Path

    if not model:
        return f"tessera-tiny-{Path(model_dir).name}"
    return Path(model).name if Path(model).expanduser().is_dir() else model
