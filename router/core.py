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
what their Ray errors mean are ``router.worker_calls``; one attempt through the pools (encode,
reserve, prefill, decode, a fork, the colocated path) is ``router.stages``; what a failure
means (retry, migrate, fail) is ``router.retry``. The driver and the cleanup are here.

Each request runs as one *driver* task feeding an event queue; ``RequestStream`` (what
``submit`` returns) reads it. Cancelling the driver (Abort, deadline, client gone) is how every
stop path enters the same cleanup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any

from cluster.config import ClusterConfig
from cluster.autoscaler import LatencyWindow
from cluster.controller import Controller
from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.engine.inputs import InputPreparer, PreparedRequest, check_chat_size, check_request_id
from cluster.request_types import InvalidRequestError, MediaInput
from models.processor import MultimodalProcessor
from router.accounting import Accounting
from router.admission import Admission
from router.events import (DeadlineExceededError, Event, FinalEvent, GenerateInput, OverloadedError, RouterError,
                           StageTimings, TokenEvent, Usage, WorkerUnavailableError)
from router.metrics import RouterMetrics
from router.request_stream import END, Failure, ForkGroup, RequestState, RequestStream
from router.token_streams import TokenStreams
from router.retry import RetryPolicy
from router.stages import StageRunner, forkable
from router.worker_calls import WorkerCalls, cancel

__all__ = ["Admission", "DeadlineExceededError", "Event", "FinalEvent", "GenerateInput", "OverloadedError",
           "RequestStream", "RouterCore", "RouterError", "StageTimings", "TokenEvent", "Usage",
           "WorkerUnavailableError"]

log = logging.getLogger(__name__)


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
        self.stages = StageRunner(config, self.accounting, self.calls, self.streams, self.metrics, self.tokenizer,
                                  self.eos_token_ids, self.max_model_len)
        self.retry = RetryPolicy(config, self.calls, self.metrics, self.stages)

    @property
    def config(self) -> ClusterConfig:
        return self._config

    @config.setter
    def config(self, config: ClusterConfig) -> None:
        """A config swapped at runtime (tests override router knobs) reaches every part."""
        self._config = config
        for part in ("accounting", "stages", "retry"):
            if hasattr(self, part):
                getattr(self, part).config = config

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
        group = ForkGroup(n - 1) if n > 1 and self.config.mode != "colocated" and forkable(prepared) else None
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

    # -- stopping, the driver, cleanup -----------------------------------------------------------
    def _stop(self, st: RequestState, reason: str) -> None:
        if st.finished or st.stop_reason:
            return
        st.stop_reason = reason
        if st.driver is not None and not st.driver.done():
            # NOTE: on the next loop turn, not now: a driver task cancelled before its first step
            # never runs ``_drive`` at all (no final event, no cleanup); tasks start in FIFO order,
            # so by then it has started and the cancel lands inside its try.
            asyncio.get_running_loop().call_soon(st.driver.cancel)

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
            return await self.stages.run_colocated(st, t, tokens, emit)
        detok = IncrementalDetokenizer(self.tokenizer, st.prepared.sampling.stop,
                                       min_tokens=st.prepared.sampling.min_tokens)
        forking = st.fork is not None and st.fork_index > 0
        while True:
            try:
                if forking:
                    forking = False
                    finish = await self.stages.fork(st, t, tokens, emit, detok)
                    if finish is not None:
                        return finish
                if st.prepared.media and st.encode_ref is None:
                    self.stages.encode(st, t)
                return await self.stages.attempt(st, t, tokens, emit, detok)
            except (asyncio.CancelledError, InvalidRequestError, OverloadedError):
                raise
            except Exception as exc:  # noqa: BLE001 - a worker failed: retry, migrate or fail
                if st.fork is not None and st.fork_index == 0 and tokens:
                    st.fork.resolve(None)  # a migration prefills prompt + tokens: not the samples' prompt
                await self.retry.retry(st, t, exc, tokens)

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
            await self.stages.release_attempt(st)
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


def _model_name(model: str, model_dir: str) -> str:
    """A hub id as is; a folder by its name; the built-in default as tessera-tiny-<arch>."""
    from pathlib import Path

    if not model:
        return f"tessera-tiny-{Path(model_dir).name}"
    return Path(model).name if Path(model).expanduser().is_dir() else model
