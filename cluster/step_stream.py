"""The token stream: one long-lived socket per (front door, worker) pair carrying one message per
engine step with every running request's new tokens — not one Ray object per token.

A decode or colocated worker listens on its private interface (``kv_transfer.interface``); a
router opens one stream to each worker it sends requests to and demultiplexes it into request
streams (``router.token_streams``)::

    router                                            worker (StepStreamServer)
      │── open_step_stream(stream_id)  [Ray call] ──────▶ issues a one-time ticket
      │◀───────────────────── {host, port, ticket} ──────│
      │── TCP connect ───────────────────────────────────▶│
      │◀── [nonce] ──────────────────────────────────────│  (cluster.channel_auth: the ticket
      │── [stream_id, HMAC(ticket, nonce ‖ stream_id)] ──▶│   never crosses this socket)
      │◀── ["ok"] ───────────────────────────────────────│
      │◀── [0, step, wall_time, [[rid, [tok, ...], finish | nil (, logprobs)], ...]]   once per engine step
      │◀── [1]                                            heartbeat, when idle (HEARTBEAT_S)

Every message is msgpack (nothing is pickled). ``finish`` is nil while a request runs, else
"stop" | "length" | "abort" | "error"; nothing follows a request's finish. ``logprobs`` only for a
request that asked for them: per token ``[logprob, [[token_id, logprob], ...]]``.

The worker's engine loop stages each step's outputs (``emit``) and hands them over once per
step (``flush``); one sender thread per stream writes them. When the router reads slower than
the engine produces, the outputs of several steps wait in the sender's queue and leave as one
merged message (a request's tokens concatenated): a slow reader gets fewer, larger messages, and
the engine never waits for the wire.

A stream ends when either side closes it, a write stalls for ``SEND_TIMEOUT_S``, or (router side)
nothing — not even a heartbeat — arrives for ``SILENCE_TIMEOUT_S``. The worker then aborts every
request of that stream (``on_lost``: a router that died leaks nothing) and the router fails the
requests it had on it (they migrate or end with UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack

from cluster import channel_auth

log = logging.getLogger(__name__)

OUTPUTS, HEARTBEAT = 0, 1
HEARTBEAT_S = 1.0  # a worker with nothing to say still writes this often (the router's liveness check)
SILENCE_TIMEOUT_S = 15.0  # router side: a stream this long without a message is lost
SEND_TIMEOUT_S = 30.0  # worker side: a write blocked this long (the router stopped reading) loses it
HANDSHAKE_TIMEOUT_S = 10.0
TICKET_TTL_S = 60.0  # an issued ticket not used by then is dropped
MAX_MESSAGE_BYTES = 64 << 20  # router side: a message larger than this ends the stream (a bug or abuse)
MAX_STREAM_ID_CHARS = 128


class RequestDelta(NamedTuple):
    """What one request got since the last message (wire: [request_id, token_ids, finish_reason]
    plus, for a request with SamplingParams.logprobs, its tokens' logprobs)."""

    request_id: str
    token_ids: list[int]  # new tokens, in order (may be empty on the final delta)
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" | "error" at the end
    logprobs: list | None = None  # one [logprob, [[token_id, logprob], ...]] per token


class StepOutputs(NamedTuple):
    """One message of a token stream: one engine step (or several merged, for a slow reader)."""

    step: int  # the worker's step counter at the last merged step
    wall_time: float  # time.time() on the worker when that step's outputs were handed over
    deltas: list[RequestDelta]


def encode_outputs(step: int, wall_time: float, deltas: list[list]) -> bytes:
    return msgpack.packb([OUTPUTS, step, wall_time, deltas])


def decode_message(msg: Any) -> StepOutputs | None:
    """A received message as StepOutputs (None for a heartbeat); ValueError if malformed."""
    if not isinstance(msg, list) or not msg:
        raise ValueError("malformed token-stream message")
    if msg[0] == HEARTBEAT:
        return None
    if msg[0] != OUTPUTS or len(msg) != 4:
        raise ValueError(f"unknown token-stream message kind {msg[0]!r}")
    return StepOutputs(msg[1], msg[2], [RequestDelta(*d) for d in msg[3]])


def merge_deltas(batches: list[list[list]]) -> list[list]:
    """Several steps' deltas as one list: per request (first-seen order) the tokens concatenated,
    the finish reason of its last delta."""
    if len(batches) == 1:
        return batches[0]
    merged: dict[str, list] = {}
    for deltas in batches:
        for rid, tokens, finish, *logprobs in deltas:
            entry = merged.get(rid)
            if entry is None:
                merged[rid] = [rid, list(tokens), finish, *(list(lp) for lp in logprobs)]
            else:
                entry[1].extend(tokens)
                entry[2] = finish
                if logprobs:
                    entry[3:] = [entry[3] + list(logprobs[0]) if len(entry) > 3 else list(logprobs[0])]
    return list(merged.values())


# -- worker side ---------------------------------------------------------------------------------
class _Channel:
    """One connected stream on the worker: a queue of staged steps and the thread that writes them."""

    def __init__(self, server: "StepStreamServer", stream_id: str, sock: socket.socket):
        self.server, self.stream_id, self.sock = server, stream_id, sock
        self.cond = threading.Condition()
        self.pending: list[tuple[int, float, list[list]]] = []
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=f"step-stream-{stream_id[:16]}", daemon=True)

    def put(self, step: int, wall_time: float, deltas: list[list]) -> None:
        with self.cond:
            if self.closed:
                return
            self.pending.append((step, wall_time, deltas))
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        _close_socket(self.sock)

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    if not self.pending and not self.closed:
                        self.cond.wait(HEARTBEAT_S)
                    if self.closed:
                        return
                    pending, self.pending = self.pending, []
                if pending:  # NOTE: several steps queued: the router reads slower than we produce
                    step, wall_time, _ = pending[-1]
                    data = encode_outputs(step, wall_time, merge_deltas([d for _, _, d in pending]))
                else:
                    data = msgpack.packb([HEARTBEAT])
                self.sock.sendall(data)
        except OSError as exc:
            if not self.closed:
                log.info("%s: token stream %s lost: %s", self.server.worker_id, self.stream_id, exc)
        finally:
            self.server._drop(self)


class StepStreamServer:
    """The worker's end: a listener on ``host``, one ``_Channel`` per connected router stream.

    ``emit`` / ``flush`` are called from the worker's event loop only; ``on_lost(stream_id)`` is
    called from a stream's thread when it ends (hop to your loop)."""

    def __init__(self, worker_id: str, host: str, on_lost: Callable[[str], None]):
        self.worker_id = worker_id
        self.on_lost = on_lost
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host.strip("[]"), 0), family=family, backlog=64)
        self.host, self.port = host, self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._tickets: dict[str, tuple[bytes, float]] = {}  # stream id -> (ticket, expiry, monotonic)
        self._channels: dict[str, _Channel] = {}
        self._staged: dict[str, list[list]] = {}  # this step's deltas per stream
        self._step = 0
        self._closed = False
        threading.Thread(target=self._accept_loop, name=f"{worker_id}-step-stream", daemon=True).start()

    # -- handing out streams (worker's event loop, from a Ray call) --------------------------
    def issue(self, stream_id: str) -> dict[str, Any]:
        """A ticket for ``stream_id`` (a router's id): {"host", "port", "ticket"}, for Ray only."""
        if not isinstance(stream_id, str) or not 0 < len(stream_id) <= MAX_STREAM_ID_CHARS:
            raise ValueError("a token stream id is 1..128 characters")
        ticket = channel_auth.new_ticket()
        now = time.monotonic()
        with self._lock:
            self._tickets = {k: v for k, v in self._tickets.items() if v[1] > now}
            self._tickets[stream_id] = (ticket, now + TICKET_TTL_S)
        return {"host": self.host, "port": self.port, "ticket": ticket}

    def is_open(self, stream_id: str) -> bool:
        with self._lock:
            return stream_id in self._channels

    @property
    def num_streams(self) -> int:
        with self._lock:
            return len(self._channels)

    # -- the engine loop's side ------------------------------------------------------------------
    def emit(self, stream_id: str, request_id: str, token_ids: list[int], finish_reason: str | None,
             logprobs: list | None = None) -> None:
        """Stage one request's output of this step (sent by the next ``flush``)."""
        staged = self._staged.get(stream_id)
        if staged is None:
            staged = self._staged[stream_id] = []
        staged.append([request_id, token_ids, finish_reason] + ([logprobs] if logprobs is not None else []))

    def flush(self) -> None:
        """Hand this step's staged outputs to their streams (never blocks on the wire)."""
        if not self._staged:
            return
        staged, self._staged = self._staged, {}
        self._step += 1
        now = time.time()
        with self._lock:
            channels = [(self._channels.get(sid), deltas) for sid, deltas in staged.items()]
        for channel, deltas in channels:
            if channel is not None:  # (a lost stream's requests are being aborted)
                channel.put(self._step, now, deltas)

    # -- connections -------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(sock,), name=f"{self.worker_id}-stream-auth",
                             daemon=True).start()

    def _handshake(self, sock: socket.socket) -> None:
        """Challenge the peer; a valid proof for an issued ticket makes it that stream."""
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce = channel_auth.new_nonce()
            sock.sendall(msgpack.packb([nonce]))
            reply = _read_one(sock, 4096)
            if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], str)
                    and isinstance(reply[1], bytes)):
                raise ValueError("malformed handshake")
            stream_id, proof = reply
            with self._lock:
                ticket = self._tickets.pop(stream_id, (None, 0.0))[0]
            if ticket is None or not channel_auth.verify(ticket, nonce, stream_id, proof):
                raise PermissionError("no ticket for that stream, or a wrong proof")
        except (OSError, ValueError, PermissionError, msgpack.UnpackException) as exc:
            log.warning("%s: refused a token-stream connection: %s", self.worker_id, exc)
            _close_socket(sock)
            return
        # Registered before the "ok": a router that has its ack may call generate() at once.
        channel = _Channel(self, stream_id, sock)
        with self._lock:
            old = self._channels.get(stream_id)
            self._channels[stream_id] = channel
        if old is not None:  # the router reconnected: what ran on the old stream was failed there
            old.close()
            self.on_lost(stream_id)
        try:
            sock.sendall(msgpack.packb(["ok"]))
            sock.settimeout(SEND_TIMEOUT_S)  # from now on only we write: a stalled reader times out
        except OSError as exc:
            log.warning("%s: token stream %s lost during its handshake: %s", self.worker_id, stream_id, exc)
            self._drop(channel)
            return
        channel.thread.start()

    def _drop(self, channel: _Channel) -> None:
        channel.close()
        with self._lock:
            if self._channels.get(channel.stream_id) is not channel:
                return  # replaced by a newer connection (already reported) or closed with the server
            del self._channels[channel.stream_id]
        if not self._closed:
            self.on_lost(channel.stream_id)

    def close(self) -> None:
        self._closed = True
        _close_socket(self._listener)
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


def _read_one(sock: socket.socket, max_bytes: int) -> Any:
    """One msgpack message from a blocking socket (handshakes only)."""
    unpacker = msgpack.Unpacker(max_buffer_size=max_bytes)
    while True:
        data = sock.recv(max_bytes)
        if not data:
            raise ConnectionError("closed during the handshake")
        unpacker.feed(data)
        for msg in unpacker:
            return msg


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# -- router side -----------------------------------------------------------------------------------
class StepStreamClient(asyncio.Protocol):
    """The router's end of one stream (``connect``). ``on_outputs(StepOutputs)`` for every step
    message, on the event loop; ``on_lost(reason)`` once, when the stream ends for any reason."""

    def __init__(self, stream_id: str, ticket: bytes, on_outputs: Callable[[StepOutputs], None],
                 on_lost: Callable[[str], None]):
        self.stream_id, self._ticket = stream_id, ticket
        self.on_outputs, self.on_lost = on_outputs, on_lost
        self._unpacker = msgpack.Unpacker(max_buffer_size=MAX_MESSAGE_BYTES)
        self._state = "challenge"  # -> "ack" -> "open" -> "closed"
        self._ready: asyncio.Future | None = None
        self._transport: asyncio.Transport | None = None
        self._last_message = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self.num_messages = 0

    @classmethod
    async def connect(cls, host: str, port: int, stream_id: str, ticket: bytes,
                      on_outputs: Callable[[StepOutputs], None], on_lost: Callable[[str], None],
                      timeout_s: float = HANDSHAKE_TIMEOUT_S) -> "StepStreamClient":
        loop = asyncio.get_running_loop()
        proto = cls(stream_id, ticket, on_outputs, on_lost)
        proto._ready = loop.create_future()
        transport, _ = await asyncio.wait_for(loop.create_connection(lambda: proto, host.strip("[]"), port), timeout_s)
        try:
            await asyncio.wait_for(asyncio.shield(proto._ready), timeout_s)
        except BaseException:
            transport.abort()
            raise
        return proto

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    def close(self) -> None:
        """End the stream from this side (``on_lost`` is not called)."""
        self._state = "closed"
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._transport is not None:
            self._transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._last_message = time.monotonic()
        try:
            self._unpacker.feed(data)
            for msg in self._unpacker:
                if self._state == "open":
                    outputs = decode_message(msg)
                    if outputs is not None:
                        self.num_messages += 1
                        self.on_outputs(outputs)
                else:
                    self._handshake(msg)
        except Exception as exc:  # noqa: BLE001 — malformed data or a bug in a callback: end the stream
            log.warning("token stream %s: %s: %s", self.stream_id, type(exc).__name__, exc)
            self._fail(f"bad token-stream data: {exc}")

    def _handshake(self, msg: Any) -> None:
        if self._state == "challenge" and isinstance(msg, list) and len(msg) == 1 and isinstance(msg[0], bytes):
            proof = channel_auth.prove(self._ticket, msg[0], self.stream_id)
            self._transport.write(msgpack.packb([self.stream_id, proof]))
            self._state = "ack"
        elif self._state == "ack" and msg == ["ok"]:
            self._state = "open"
            self._arm_watchdog()
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        else:
            raise ValueError(f"unexpected handshake message in state {self._state}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection closed{f': {exc}' if exc else ''}")

    def _fail(self, reason: str) -> None:
        if self._state == "closed":
            return
        was_open = self._state == "open"
        self._state = "closed"
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._transport is not None:
            self._transport.abort()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ConnectionError(f"token stream handshake failed: {reason}"))
        if was_open:
            self.on_lost(reason)

    def _arm_watchdog(self) -> None:
        self._last_message = time.monotonic()
        loop = asyncio.get_running_loop()

        def check() -> None:
            if self._state != "open":
                return
            silent = time.monotonic() - self._last_message
            if silent > SILENCE_TIMEOUT_S:
                self._fail(f"no message for {silent:.0f} s")
                return
            self._watchdog = loop.call_later(HEARTBEAT_S * 2, check)

        self._watchdog = loop.call_later(HEARTBEAT_S * 2, check)
