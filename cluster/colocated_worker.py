"""``ColocatedWorker``: the colocated engine (encode + prefill + decode in one process) as a Ray
actor, served by the same router as the disaggregated pools.

This is the baseline every benchmark compares against, behind the same front door, and the
deployment for a single small GPU. A request's life inside the worker::

    generate(PreparedRequest) ─▶ pending   (the router already validated it)
    engine loop: apply pending adds/aborts ─▶ engine.step() in the model thread
                 ─▶ RequestOutput per request ─▶ that request's asyncio.Queue
    generate yields DecodeOutput(token_ids, None) ... DecodeOutput(tokens, "stop"|"length"|"abort")

Adds and aborts are applied by the loop between steps, never while a step runs in the model
thread, so the engine is only ever touched by one thread at a time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.config import EngineConfig
from cluster.contracts import DecodeOutput
from cluster.engine.colocated import ColocatedEngine
from cluster.engine.inputs import PreparedRequest
from cluster.worker_base import BaseWorker


class ColocatedWorker(BaseWorker):
    pool = "colocated"

    def __init__(self, engine: EngineConfig, worker_id: str, *, torch_threads: int = 1):
        super().__init__(worker_id, torch_threads)
        self.config = engine
        self.engine = ColocatedEngine(engine, self.faults)
        self._pending: list[PreparedRequest] = []
        self._aborts: set[str] = set()
        self._queues: dict[str, asyncio.Queue] = {}
        self._num_finished = 0

    async def generate(self, prepared: PreparedRequest):
        """Streaming generator of ``DecodeOutput``; the first chunk holds the first token."""
        self._ensure_loop()
        rid = prepared.request_id
        if rid in self._queues:
            raise ValueError(f"duplicate request id {rid!r}")
        queue = self._queues[rid] = asyncio.Queue()
        self._pending.append(prepared)
        self._notify()
        finished = False
        try:
            while not finished:
                token_ids, reason = await queue.get()
                while reason is None and not queue.empty():  # a slow reader gets merged chunks
                    more, reason = queue.get_nowait()
                    token_ids = token_ids + more
                finished = reason is not None
                yield DecodeOutput(token_ids, reason)
        finally:
            if not finished:  # cancelled or closed by the consumer
                self._aborts.add(rid)
                self._notify()

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._queues:
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
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is None:
                    continue
                queue.put_nowait((out.new_token_ids, out.finish_reason if out.finished else None))
                if out.finished:
                    self._done(out.request_id)

    def _apply_control(self) -> None:
        pending, self._pending = self._pending, []
        for prepared in pending:
            if prepared.request_id in self._aborts:
                continue
            self.engine.add_prepared(prepared)
        aborts, self._aborts = self._aborts, set()
        for rid in aborts:
            self.engine.abort(rid)
            queue = self._queues.get(rid)
            if queue is not None:
                queue.put_nowait(([], "abort"))
                self._done(rid)

    def _done(self, rid: str) -> None:
        self._queues.pop(rid, None)
        self._num_finished += 1

    def _on_loop_crash(self) -> None:
        for queue in self._queues.values():
            queue.put_nowait(([], "error"))
        self._queues.clear()

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
        }
