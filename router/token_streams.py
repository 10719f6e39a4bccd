"""The router's token streams: one ``StepStreamClient`` per decode / colocated worker it sends
requests to (opened on first use, reopened after a loss), and the demultiplexer from their step
messages to the requests' sinks.

    worker ══ StepOutputs (one per engine step) ══▶ TokenStreams._on_outputs
                                                     └─ for each delta: sinks[worker][request].push(tokens, finish)

A sink is registered *before* its request is sent to the worker (its first tokens may arrive
before the Ray call that started it returns) and unregistered when the request's attempt ends;
deltas for unregistered requests (a request the router already finished, whose abort has not
reached the worker yet) are dropped. When a stream is lost, every sink on it fails with
``WorkerUnavailableError`` (the request migrates, or ends with UNAVAILABLE).

Per delta the work here is a dict lookup and the sink's own (``router.decode_sink``): O(1).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Protocol

from cluster.step_stream import StepOutputs, StepStreamClient
from router.events import WorkerUnavailableError

log = logging.getLogger(__name__)


class Sink(Protocol):
    def push(self, token_ids: list[int], finish_reason: str | None, logprobs: list | None = None) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class TokenStreams:
    def __init__(self, stream_id: str | None = None):
        self.stream_id = stream_id or f"router-{uuid.uuid4().hex[:16]}"  # this router's name on every worker
        self._clients: dict[str, StepStreamClient] = {}  # worker id -> open stream
        self._opening: dict[str, asyncio.Task] = {}
        self._sinks: dict[str, dict[str, Sink]] = {}  # worker id -> request id -> sink
        self.num_lost = 0

    async def ensure(self, worker) -> None:
        """The stream to ``worker`` (a ``PoolWorker``) is open; opens it if not (raises if it cannot)."""
        wid = worker.worker_id
        client = self._clients.get(wid)
        if client is not None and client.is_open:
            return
        task = self._opening.get(wid)
        if task is None:
            task = self._opening[wid] = asyncio.ensure_future(self._open(worker))
            task.add_done_callback(lambda _: self._opening.pop(wid, None))
        await asyncio.shield(task)

    async def _open(self, worker) -> None:
        wid = worker.worker_id
        info = await worker.actor.open_step_stream.remote(self.stream_id)
        client = await StepStreamClient.connect(
            info["host"], int(info["port"]), self.stream_id, info["ticket"],
            on_outputs=lambda outputs: self._on_outputs(wid, outputs),
            on_lost=lambda reason: self._on_lost(wid, reason))
        old = self._clients.get(wid)
        self._clients[wid] = client
        if old is not None:
            old.close()

    def register(self, worker_id: str, request_id: str, sink: Sink) -> None:
        sinks = self._sinks.get(worker_id)
        if sinks is None:
            sinks = self._sinks[worker_id] = {}
        sinks[request_id] = sink

    def unregister(self, worker_id: str, request_id: str) -> None:
        sinks = self._sinks.get(worker_id)
        if sinks is not None:
            sinks.pop(request_id, None)

    def num_open(self) -> int:
        return sum(1 for c in self._clients.values() if c.is_open)

    def close(self) -> None:
        for client in list(self._clients.values()):
            client.close()
        self._clients.clear()

    # -- callbacks from the streams (on the event loop) -----------------------------------------
    def _on_outputs(self, worker_id: str, outputs: StepOutputs) -> None:
        sinks = self._sinks.get(worker_id)
        if not sinks:
            return
        for delta in outputs.deltas:
            sink = sinks.get(delta.request_id)
            if sink is not None:
                sink.push(delta.token_ids, delta.finish_reason, delta.logprobs)

    def _on_lost(self, worker_id: str, reason: str) -> None:
        self.num_lost += 1
        self._clients.pop(worker_id, None)
        sinks = self._sinks.pop(worker_id, {})
        log.warning("token stream to %s lost (%s); %d requests on it fail over", worker_id, reason, len(sinks))
        error = WorkerUnavailableError(f"lost the token stream of {worker_id}: {reason}")
        for sink in sinks.values():
            sink.fail(error)
