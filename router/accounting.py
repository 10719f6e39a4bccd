"""The router's view of each worker's load, and decode reservations.

Routing reads counters on the controller's worker records (``PoolWorker``: in-flight tokens and
requests, reserved KV blocks) that the workers' own load reports do not cover yet. Every amount
a request adds is remembered on its state (``RequestState.accounted``) and taken back exactly
once, by pool, when that part of the request is done (``unaccount``).

``reserve`` asks the decode workers for KV blocks, most free blocks first; when every one is
full it waits (bounded by ``router.max_queued_requests`` waiters) until a request frees blocks
(``notify_freed``) or 0.2 s pass (another router may have freed some).
"""

from __future__ import annotations

import asyncio
import contextlib
import math

from cluster.config import ClusterConfig
from cluster.contracts import Reservation
from cluster.controller import Controller, PoolWorker
from cluster.engine.block_manager import NoFreeBlocksError
from router import policies
from router.events import OverloadedError, WorkerUnavailableError
from router.request_stream import RequestState
from router.worker_calls import WorkerCalls


class Accounting:
    def __init__(self, config: ClusterConfig, controller: Controller, calls: WorkerCalls, max_model_len: int):
        self.config, self.controller, self.calls = config, controller, calls
        self.max_model_len = max_model_len
        self._blocks_freed = asyncio.Event()
        self._num_waiting_for_blocks = 0

    def ready(self, pool: str, avoid: set[str] = frozenset()) -> list[PoolWorker]:
        """The pool's ready workers, without those in ``avoid`` (that failed this request) unless
        only those are left."""
        workers = self.controller.ready_workers(pool)
        if not workers:
            raise WorkerUnavailableError(f"no ready {pool} worker")
        return [w for w in workers if w.worker_id not in avoid] or workers

    def blocks_for(self, num_prompt: int, max_tokens: int) -> int:
        """The KV blocks a decode worker holds for a request (``DecodeWorker._blocks_for_new_request``)."""
        return math.ceil(min(num_prompt + max_tokens, self.max_model_len) / self.config.engine.block_size)

    def account(self, st: RequestState, worker: PoolWorker, attr: str, amount: int) -> None:
        setattr(worker, attr, getattr(worker, attr) + amount)
        st.accounted.append((worker, attr, amount))

    def unaccount(self, st: RequestState, *pools: str) -> None:
        """Undo what the request still has accounted on workers of ``pools``."""
        kept = []
        for worker, attr, amount in st.accounted:
            if worker.pool in pools:
                setattr(worker, attr, getattr(worker, attr) - amount)
            else:
                kept.append((worker, attr, amount))
        st.accounted[:] = kept

    def notify_freed(self) -> None:
        """A request let go of its decode blocks: waiting reservations try again."""
        self._blocks_freed.set()

    async def reserve(self, st: RequestState, num_prompt: int, max_tokens: int) -> Reservation:
        num_blocks = self.blocks_for(num_prompt, max_tokens)
        waiting = False
        try:
            while True:
                failure: Exception | None = None
                num_failed = 0
                candidates = policies.rank_decode(self.ready("decode", st.avoid), num_blocks)
                for worker in candidates:
                    ref = worker.actor.reserve.remote(st.request_id, num_prompt, max_tokens)
                    st.pending_reserve = (worker, ref)  # cancelled while waiting: cleanup undoes it
                    try:
                        reservation = await ref
                        st.pending_reserve = None
                    except NoFreeBlocksError:
                        st.pending_reserve = None
                        continue  # full: try the next decode worker
                    except Exception as exc:  # noqa: BLE001 - a failed worker: try the next one
                        st.pending_reserve = None
                        failure, num_failed = self.calls.failure(exc, worker), num_failed + 1
                        continue
                    if reservation is not None:
                        st.decode_worker = worker
                        self.account(st, worker, "reserved_blocks", len(reservation.block_ids))
                        self.account(st, worker, "inflight_requests", 1)
                        return reservation
                if failure is not None and num_failed == len(candidates):
                    raise failure
                # Every decode worker is full: wait (bounded) for a request to free blocks.
                if not waiting:
                    if self._num_waiting_for_blocks >= self.config.router.max_queued_requests:
                        raise OverloadedError("no free KV blocks on any decode worker and the wait queue is full")
                    self._num_waiting_for_blocks += 1
                    waiting = True
                self._blocks_freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):  # also re-polls: another router may free blocks
                        await self._blocks_freed.wait()
        finally:
            if waiting:
                self._num_waiting_for_blocks -= 1
