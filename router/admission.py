"""Admission control: a bounded number of requests in the pools, a bounded FIFO queue before it."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from router.events import OverloadedError


class Admission:
    """At most ``max_inflight`` requests in the pools; at most ``max_queued`` waiting (FIFO);
    beyond that ``OverloadedError``. A released slot is handed straight to the oldest waiter."""

    def __init__(self, max_inflight: int, max_queued: int):
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.num_inflight = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def num_queued(self) -> int:
        return sum(not f.done() for f in self._waiters)

    async def acquire(self) -> None:
        if self.num_inflight < self.max_inflight and not self._waiters:
            self.num_inflight += 1
            return
        if self.num_queued >= self.max_queued:
            raise OverloadedError(
                f"server overloaded: {self.num_inflight} requests running and {self.num_queued} queued")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter; num_inflight unchanged
                return
        self.num_inflight -= 1
