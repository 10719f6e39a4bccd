"""One request's state in the router (``RequestState``) and the async iterator a front end reads
its events from (``RequestStream``). ``RouterCore`` owns both; this module only holds the types."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cluster.contracts import Reservation
from cluster.controller import PoolWorker
from cluster.engine.inputs import PreparedRequest
from cluster.request_types import MediaInput
from router.events import Event, TokenEvent

if TYPE_CHECKING:
    from router.core import RouterCore


@dataclass
class Failure:
    error: BaseException


END = object()


class EventQueue:
    """One request's events, from the core to its reader. ``put_nowait`` never blocks; ``get_all``
    hands over everything queued at once (waiting while empty), so a reader that fell behind
    catches up in one wake-up instead of one per event."""

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get_all(self) -> list:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items


def coalesce(items: list, keep_first: bool = False) -> list:
    """Consecutive ``TokenEvent``s merged into one (tokens and text concatenated, in order);
    ``keep_first``: the first item stays on its own (a stream's first event holds the first token
    alone)."""
    out: list = []
    for item in items:
        if isinstance(item, TokenEvent) and len(out) > keep_first and isinstance(out[-1], TokenEvent):
            prev = out[-1]
            out[-1] = TokenEvent(prev.token_ids + item.token_ids, prev.text + item.text,
                                 None if prev.logprobs is None else prev.logprobs + (item.logprobs or []))
        else:
            out.append(item)
    return out


# -- per-request state -------------------------------------------------------------------------
@dataclass
class ForkGroup:
    """The samples of one ``n > 1`` request: sample 0 runs the whole path and, when its decode
    starts, resolves ``source`` with (decode worker, its request id, prompt token ids); the other
    samples fork from that prompt KV (``DecodeWorker.fork``). None: nothing to fork from (sample
    0 failed or ended at its first token), they are prefilled themselves."""

    num_forks: int
    source: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def resolve(self, value: tuple | None) -> None:
        if not self.source.done():
            self.source.set_result(value)


@dataclass
class RequestState:
    request_id: str
    prepared: PreparedRequest
    media: list[MediaInput]
    deadline: float  # time.monotonic()
    arrival: float  # time.monotonic() when submit() was called
    prepared_at: float  # ... and when preparation ended (admission queueing starts)
    queue: EventQueue = field(default_factory=EventQueue)
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
    sink: Any = None  # router.decode_sink.DecodeSink of this attempt's decode (registered in the token streams)
    decode_done: bool = False
    accounted: list[tuple[PoolWorker, str, int]] = field(default_factory=list)  # (worker, attr, amount)
    avoid: set[str] = field(default_factory=set)  # ids of workers that failed this request
    num_retries: dict[str, int] = field(default_factory=dict)  # "encoder" | "prefill" | "decode" -> retries so far
    fork: ForkGroup | None = None  # n > 1 in disaggregated mode: the group of samples ...
    fork_index: int = 0  # ... and which one this is (0 runs the whole path)


class RequestStream:
    """Async iterator over one request's events: ``TokenEvent``\\* then one ``FinalEvent``; token
    events that queued up while the reader was busy come as one merged event.
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
        sent_first = False
        try:
            while True:
                if st.stop_reason:
                    items = await st.queue.get_all()  # stopping: the driver reports how it ended
                else:
                    try:
                        async with asyncio.timeout_at(_loop_time(st.deadline)):
                            items = await st.queue.get_all()
                    except TimeoutError:
                        self._core._stop(st, "deadline")
                        continue
                for item in coalesce(items, keep_first=not sent_first):
                    sent_first = True
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
