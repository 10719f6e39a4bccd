"""One request's state in the router (``RequestState``) and the async iterator a front end reads
its events from (``RequestStream``). ``RouterCore`` owns both; this module only holds the types."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cluster.contracts import Reservation
from cluster.controller import PoolWorker
from cluster.engine.inputs import PreparedRequest
from models.processor import MediaInput
from router.events import Event

if TYPE_CHECKING:
    from router.core import RouterCore


@dataclass
class Failure:
    error: BaseException


END = object()


# -- per-request state -------------------------------------------------------------------------
@dataclass
class RequestState:
    request_id: str
    prepared: PreparedRequest
    media: list[MediaInput]
    deadline: float  # time.monotonic()
    arrival: float  # time.monotonic() when submit() was called
    prepared_at: float  # ... and when preparation ended (admission queueing starts)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    driver: asyncio.Task | None = None
    stop_reason: str = ""  # "abort" | "deadline" | "cancelled", set before cancelling the driver
    num_tokens_sent: int = 0
    finished: bool = False
    # what to let go of (the prefill/decode fields are per attempt: a retry or a migration starts
    # them anew, see RouterCore._retry)
    encode_ref: Any = None
    encoder_worker: PoolWorker | None = None
    prefill_worker: PoolWorker | None = None
    prefill_gen: Any = None
    prefill_has_token: bool = False  # this attempt's prefill sent its first token (the KV ships now)
    prefill_drained: bool = False
    reservation: Reservation | None = None
    pending_reserve: tuple[PoolWorker, Any] | None = None  # (decode worker, reserve() ref) in flight
    decode_worker: PoolWorker | None = None
    decode_gen: Any = None
    decode_done: bool = False
    accounted: list[tuple[PoolWorker, str, int]] = field(default_factory=list)  # (worker, attr, amount)
    avoid: set[str] = field(default_factory=set)  # ids of workers that failed this request
    num_retries: dict[str, int] = field(default_factory=dict)  # "encoder" | "prefill" | "decode" -> retries so far


class RequestStream:
    """Async iterator over one request's events: ``TokenEvent``\\* then one ``FinalEvent``.
    Raises a ``RouterError`` instead if the request fails before its first token, and
    ``DeadlineExceededError`` whenever its deadline passes (after tokens too, as a gRPC deadline
    does). Closing it early (``aclose``; a cancelled consumer) cancels the request."""

    def __init__(self, core: "RouterCore", state: RequestState):
        self._core = core
        self._state = state
        self.request_id = state.request_id
        self.prompt_tokens = len(state.prepared.plan.prompt_token_ids)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        st = self._state
        try:
            while True:
                if st.stop_reason:
                    item = await st.queue.get()  # stopping: the driver reports how it ended
                else:
                    try:
                        async with asyncio.timeout_at(_loop_time(st.deadline)):
                            item = await st.queue.get()
                    except TimeoutError:
                        self._core._stop(st, "deadline")
                        continue
                if item is END:
                    return
                if isinstance(item, Failure):
                    raise item.error
                yield item
        finally:
            if not st.finished:
                self._core._stop(st, "cancelled")

    async def aclose(self) -> None:
        if not self._state.finished:
            self._core._stop(self._state, "cancelled")


def _loop_time(monotonic_deadline: float) -> float:
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
