"""``ColocatedWorker``: the colocated engine (encode + prefill + decode in one process) as a Ray
actor, served by the same router as the disaggregated pools.

This is the baseline every benchmark compares against, behind the same front door, and the
deployment for a single small GPU. A request's life inside the worker::

    generate(PreparedRequest, stream_id) ─▶ pending   (the router already validated it); returns
    engine loop: apply pending adds/aborts ─▶ engine.step() in the model thread
                 ─▶ RequestOutput per request ─▶ one message per step on each router's token
                    stream (``cluster.step_stream``); a request's first delta holds its first
                    token, its last one the finish reason ("stop"|"length"|"abort"|"error")

Adds and aborts are applied by the loop between steps, never while a step runs in the model
thread, so the engine is only ever touched by one thread at a time. The engine checks stop
strings itself (its detokenizer costs ~1 µs a token), so a stopped request's blocks are free at
once; the text clients see is the router's.
"""

from __future__ import annotations

from typing import Any

from cluster.config import EngineConfig
from cluster.engine.colocated import ColocatedEngine
from cluster.engine.inputs import PreparedRequest
from cluster.worker_base import BaseWorker


class ColocatedWorker(BaseWorker):
    pool = "colocated"

    def __init__(self, engine: EngineConfig, worker_id: str, *, stream_interface: str = "127.0.0.1",
                 torch_threads: int = 1):
        super().__init__(worker_id, torch_threads)
        self.config = engine
        self.engine = ColocatedEngine(engine, self.faults)
        self._pending: list[PreparedRequest] = []
        self._aborts: set[str] = set()
        self._streams_of: dict[str, str] = {}  # request id -> its router's token stream id
        self._num_finished = 0
        self._start_step_streams(stream_interface)

    async def generate(self, prepared: PreparedRequest, stream_id: str) -> None:
        """Queue a request; returns at once. Its outputs go to ``stream_id``'s token stream."""
        self._ensure_loop()
        rid = prepared.request_id
        if rid in self._streams_of:
            raise ValueError(f"duplicate request id {rid!r}")
        self._check_stream(stream_id)
        self._streams_of[rid] = stream_id
        self._pending.append(prepared)
        self._notify()

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._streams_of:
            return False
        self._aborts.add(request_id)
        self._notify()
        return True

    # -- the loop ----------------------------------------------------------------------------
    async def _engine_loop(self) -> None:
        while True:
            self._apply_control()
            if not self.engine.has_unfinished():
                await self._wait_for_work()
                continue
            outputs = await self.run_step(self.engine.step)
            if self.engine.last_step_error is not None:  # its requests got "error" outputs below
                self._step_failed(self.engine.last_step_error, sum(o.finish_reason == "error" for o in outputs))
            else:
                self._step_ok()
            emit = self.streams.emit
            for out in outputs:
                stream_id = self._streams_of.get(out.request_id)
                if stream_id is None:
                    continue
                emit(stream_id, out.request_id, out.new_token_ids, out.finish_reason if out.finished else None,
                     out.logprobs)
                if out.finished:
                    self._done(out.request_id)
            self.streams.flush()  # send: one message per token stream for the whole step

    def _apply_control(self) -> None:
        pending, self._pending = self._pending, []
        for prepared in pending:
            if prepared.request_id in self._aborts:
                continue
            self.engine.add_prepared(prepared)
        aborts, self._aborts = self._aborts, set()
        for rid in aborts:
            self.engine.abort(rid)
            stream_id = self._streams_of.get(rid)
            if stream_id is not None:
                self.streams.emit(stream_id, rid, [], "abort")
                self._done(rid)
        self.streams.flush()

    def _done(self, rid: str) -> None:
        self._streams_of.pop(rid, None)
        self._num_finished += 1

    def _on_stream_lost(self, stream_id: str) -> None:
        """The router of ``stream_id`` is gone: its requests stop at the next step."""
        lost = [rid for rid, sid in self._streams_of.items() if sid == stream_id]
        if lost:
            self._aborts.update(lost)
            self._notify()

    def _on_loop_crash(self) -> None:
        for rid, stream_id in self._streams_of.items():
            self.streams.emit(stream_id, rid, [], "error")
        self.streams.flush()
        self._streams_of.clear()

    def _on_shutdown(self) -> None:
        self._on_loop_crash()

    def _load(self) -> dict[str, Any]:
        sched = self.engine.scheduler
        return {
            "num_queued_requests": len(sched.waiting) + len(self._pending),
            "num_queued_tokens": sum(r.num_pending_tokens for r in sched.waiting),
            "num_running": len(sched.running),
            "num_finished": self._num_finished,
            "kv_blocks_free": self.engine.blocks.num_free_blocks,
            "kv_blocks_total": self.engine.blocks.num_blocks,
            "kv_blocks_cached": self.engine.blocks.num_cached_blocks,  # (free, but hold reusable prefix KV)
            "prefix_cache_query_tokens": sched.num_prefix_query_tokens,
            "prefix_cache_hit_tokens": sched.num_prefix_hit_tokens,
            "max_model_len": self.engine.max_model_len,
            "num_token_streams": self.streams.num_streams,
        }
