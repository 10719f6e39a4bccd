"""``DecodeWorker``: block reservation, KV receive into paged blocks, continuous-batching decode.

A request's life inside the worker (one ``_Slot`` per request id)::

    reserve(id, prompt, max_tokens) ─▶ RESERVED    blocks for prompt + max_tokens (<= max_model_len)
    kv_expect(id, prefill_id)       ─▶ EXPECTING   a transfer is coming: blocks held until it ends
    kv_receive(id, ticket)          ─▶ LANDED      (recv thread) KV scattered into the reserved blocks
    generate(DecodeRequest)         ─▶ RUNNING     Request(num_computed=len(prompt), output=[first])
                                                   joins the running batch (Scheduler.add_running);
                                                   generate returns
      (layer-wise KV streaming: generate comes with the prefill, before the KV and the first
       token exist; it waits for kv_first_token(id, token) from the prefill worker and for the
       KV to land, and admits the request the moment both are there)
    fork(parent, DecodeRequest)     ─▶ RUNNING     sample i > 0 of an n > 1 request (see "Forks")
    engine loop: aborts -> schedule (one token per running request) -> execute (model thread)
                 -> post-process (append, token-level stops) -> send: one message per step per
                 router token stream with every request's new token (``cluster.step_stream``)
    the last delta of a request carries its finish reason: "stop" | "length" | "abort" | "error"

Freeing: finish (stop/length) and abort free the blocks in the engine loop, between steps, so a
step in flight never writes into a block someone else got. ``abort`` frees a RESERVED/LANDED
slot at once; an EXPECTING one when its transfer ends (the sender is mid-send and must be drained).
A router whose token stream ends (it died, or gave up on this worker) has every running request
of that stream aborted. Reservations nobody uses are freed after ``reservation_ttl_s``. Because a
reservation covers max_tokens, decode never preempts.

Forks (``n > 1``: one prefill, one transfer for all samples). ``generate(request, num_forks=k)``
pins the blocks that hold the prompt's positions ``[0, len(prompt) - 1)`` with a reference of
their own. Each of the k ``fork`` calls then shares the full ones (nobody writes them again: the
parent writes from position len(prompt) on) and copies the last one into a block of its own; its
first step recomputes the prompt's last token there and samples the sample's first token with its
own sampler (seed + i). The pin goes when the k forks took it, or after ``fork_ttl_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from cluster.config import EngineConfig, KVTransferConfig
from cluster.contracts import DecodeRequest, ForkUnavailableError, Reservation
from cluster.engine.block_manager import NoFreeBlocksError
from cluster.engine.setup import build_lm_engine, resolve_engine_model
from cluster.engine.request import Request, RequestStatus
from cluster.kv_transfer import KVTicket, KVTransferError
from cluster.worker_base import BaseWorker, make_kv_endpoint
from models.loader import load_model

logger = logging.getLogger(__name__)


class SlotState(enum.Enum):
    RESERVED = "reserved"  # blocks set aside, no KV yet
    EXPECTING = "expecting"  # a prefill worker announced (kv_expect) or is sending (kv_receive) the KV
    LANDED = "landed"  # KV in the blocks, waiting for generate()
    RUNNING = "running"  # in the decode batch; the blocks belong to the scheduler's Request


@dataclass
class _Slot:
    request_id: str
    block_ids: list[int]  # reserved block ids (emptied when handed to the running Request)
    state: SlotState = SlotState.RESERVED
    created: float = field(default_factory=time.monotonic)
    expect_until: float = 0.0  # EXPECTING with no receive running: freed after this (monotonic s)
    is_receiving: bool = False
    is_aborted: bool = False
    error: str | None = None
    landed: asyncio.Event = field(default_factory=asyncio.Event)  # set when the receive ended (ok or not)
    first: tuple[int, bytes | None] | None = None  # (first token, sampler state) from kv_first_token
    has_first: asyncio.Event = field(default_factory=asyncio.Event)  # set with `first`, or on release
    req: Request | None = None
    stream_id: str = ""  # RUNNING: the router token stream its outputs go to


@dataclass
class _ForkSource:
    """A request's prompt blocks, pinned for its forks (see "Forks" above)."""

    block_ids: list[int]  # the blocks of positions [0, num_prompt - 1): all shared but the last, copied
    num_prompt: int
    remaining: int  # forks still to come
    expires: float  # monotonic s


class DecodeWorker(BaseWorker):
    pool = "decode"

    def __init__(self, engine: EngineConfig, worker_id: str, kv_transfer: KVTransferConfig | None = None, *,
                 reservation_ttl_s: float = 300.0, max_concurrent_receives: int = 16, torch_threads: int = 1,
                 fork_ttl_s: float = 10.0):
        super().__init__(worker_id, torch_threads)
        self.config = engine
        self.kv_config = kv_transfer or KVTransferConfig()
        model = load_model(resolve_engine_model(engine), dtype=engine.torch_dtype, device=engine.device,
                           parts=("language_model",))
        lm = build_lm_engine(engine, model, prefix_caching=False)  # KV arrives into reserved blocks
        self.runner, self.blocks, self.scheduler, self.max_model_len = (
            lm.runner, lm.blocks, lm.scheduler, lm.max_model_len)
        self.receiver = make_kv_endpoint("receiver", self.kv_config.transport, worker_id,
                                         timeout_s=self.kv_config.timeout_s, host=self.kv_config.interface,
                                         device=engine.device)
        self._recv_executor = ThreadPoolExecutor(max_concurrent_receives, thread_name_prefix=f"{worker_id}-kv")
        self._start_step_streams(self.kv_config.interface)
        self.reservation_ttl_s = reservation_ttl_s
        self.fork_ttl_s = fork_ttl_s
        self._slots: dict[str, _Slot] = {}
        self._forks: dict[str, _ForkSource] = {}  # parent request id -> its pinned prompt blocks
        self._aborts: dict[str, list[asyncio.Future]] = {}  # RUNNING requests to abort between steps
        self._next_sweep = 0.0
        self._num_finished = 0
        self._handle = None  # this actor's own handle, named in reservations for the prefill side

    # -- reservation and KV receive --------------------------------------------------------
    async def reserve(self, request_id: str, num_prompt_tokens: int, max_tokens: int) -> Reservation:
        """Blocks for prompt + max_tokens; raises NoFreeBlocksError when this worker is full."""
        self._ensure_loop()
        if request_id in self._slots:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not 0 < num_prompt_tokens < self.max_model_len:
            raise ValueError(f"prompt of {num_prompt_tokens} tokens; the context length is {self.max_model_len}")
        block_ids = self.blocks.allocate(self._blocks_for_new_request(num_prompt_tokens, max_tokens))
        self._slots[request_id] = _Slot(request_id, block_ids)
        if self._handle is None:
            import ray

            self._handle = ray.get_runtime_context().current_actor
        return Reservation(self.worker_id, request_id, list(block_ids), self._handle)

    async def kv_prepare_pair(self, peer_id: str) -> dict[str, Any]:
        """The receiver's pair info for sender ``peer_id`` (msgpack-able; opens nothing)."""
        return self.receiver.prepare_pair(peer_id)

    async def kv_forget_peer(self, peer_id: str) -> None:
        """Prefill worker ``peer_id`` left the pool: drop the pair with it."""
        self.receiver.forget(peer_id)

    async def kv_expect(self, request_id: str, sender_id: str) -> dict[str, Any]:
        """A prefill worker is about to send this request's KV: from now on an abort keeps the
        blocks until the transfer ends. Returns ``kv_prepare_pair(sender_id)``."""
        slot = self._slots.get(request_id)
        if slot is None or slot.is_aborted or slot.state is not SlotState.RESERVED:
            raise KVTransferError(f"no open reservation for {request_id!r} on {self.worker_id}", transfer_id=request_id)
        slot.state = SlotState.EXPECTING
        slot.expect_until = time.monotonic() + self.kv_config.timeout_s + 5.0
        return self.receiver.prepare_pair(sender_id)

    async def kv_receive(self, request_id: str, ticket: KVTicket) -> int:
        """Receive the KV ``ticket`` names into the reservation; returns payload bytes."""
        slot = self._slots.get(request_id)
        if slot is None or slot.state not in (SlotState.RESERVED, SlotState.EXPECTING) or slot.is_receiving:
            raise KVTransferError(f"no reservation waiting for KV for {request_id!r} on {self.worker_id}",
                                  transfer_id=ticket.meta.transfer_id)
        slot.state, slot.is_receiving = SlotState.EXPECTING, True
        dst = slot.block_ids[:ticket.meta.num_blocks]
        recv = asyncio.get_running_loop().run_in_executor(self._recv_executor, self._recv, ticket, dst)
        try:
            num_bytes = await asyncio.shield(recv)
        except asyncio.CancelledError:  # NOTE: the thread still writes into the blocks: free them after it
            slot.is_aborted = True
            recv.add_done_callback(lambda f: (f.cancelled() or f.exception(), self._release(slot)))
            raise
        except Exception as exc:
            slot.is_receiving, slot.error = False, f"{type(exc).__name__}: {exc}"
            self._release(slot)  # wakes a waiting generate(), which then fails
            raise
        slot.is_receiving = False
        if slot.is_aborted:  # aborted mid-transfer: the data was drained, now let the blocks go
            self._release(slot)
        else:
            slot.state = SlotState.LANDED
            slot.landed.set()
        return num_bytes

    async def kv_first_token(self, request_id: str, token_id: int, sampler_state: bytes | None) -> bool:
        """The prefill worker's first token of a request started early (``first_from_prefill``);
        False if its reservation is gone (aborted, expired)."""
        slot = self._slots.get(request_id)
        if slot is None or slot.is_aborted or slot.state is SlotState.RUNNING or slot.first is not None:
            return False
        slot.first = (int(token_id), sampler_state)
        slot.has_first.set()
        return True

    def _recv(self, ticket: KVTicket, dst: list[int]) -> int:
        """Receive thread: the transfer's payload into blocks ``dst``."""
        self.faults.hit("kv_receive")
        return self.receiver.recv(ticket, self.runner.kv_cache, dst)

    # -- decoding --------------------------------------------------------------------------
    async def generate(self, request: DecodeRequest, num_forks: int = 0) -> None:
        """Start decoding (the first token, from prefill, is not repeated); returns once the request
        runs. Its outputs go to ``request.stream_id``'s token stream, step by step. ``num_forks``:
        that many other samples of this prompt will ``fork`` from it."""
        self._ensure_loop()
        rid = request.request_id
        slot = self._slots.get(rid)
        if slot is None or slot.is_aborted or slot.state is SlotState.RUNNING:
            raise ValueError(f"no reservation for {rid!r} on {self.worker_id} (aborted, expired or running)")
        self._check_stream(request.stream_id)
        if request.first_from_prefill:  # started with the prefill: its first token comes from there
            # (no deadline of its own: the prompt may queue; an abort, a failed transfer or the
            # reservation's TTL sets the event too)
            await slot.has_first.wait()
            if slot.first is None or slot.is_aborted:
                raise KVTransferError(f"no first token for {rid!r}: {slot.error or 'aborted'}")
            request = dataclasses.replace(request, first_token=slot.first[0], sampler_state=slot.first[1],
                                          first_from_prefill=False)
        req = self._make_request(request)
        status = req.check_stop(self.max_model_len)
        if status is not None:  # the first token ended it (prefill shipped no KV)
            self._abort_slot(slot)
            self.streams.emit(request.stream_id, rid, [], status.value)
            self.streams.flush()
            return
        if slot.state is not SlotState.LANDED:
            try:
                await asyncio.wait_for(slot.landed.wait(), self.kv_config.timeout_s)
            except asyncio.TimeoutError:
                self._abort_slot(slot)
                raise KVTransferError(f"KV for {rid!r} did not land within {self.kv_config.timeout_s}s") from None
            if slot.state is not SlotState.LANDED:
                raise KVTransferError(f"KV for {rid!r} did not land: {slot.error or 'aborted'}")
        req.block_ids, slot.block_ids = slot.block_ids, []
        slot.state, slot.req, slot.stream_id = SlotState.RUNNING, req, request.stream_id
        self.scheduler.add_running(req)
        if num_forks > 0:
            pinned = req.block_ids[:(req.num_prompt_tokens - 1) // self.blocks.block_size + 1]
            self.blocks.fork(pinned)
            self._forks[rid] = _ForkSource(pinned, req.num_prompt_tokens, num_forks,
                                           time.monotonic() + self.fork_ttl_s)
        self._notify()

    async def fork(self, parent_id: str, request: DecodeRequest) -> None:
        """Start ``request``, another sample of ``parent_id``'s prompt, on the parent's pinned
        prompt KV; returns once it runs. ForkUnavailableError: nothing to fork from (any more);
        NoFreeBlocksError: no room for its own blocks."""
        self._ensure_loop()
        rid = request.request_id
        source = self._forks.get(parent_id)
        if request.first_token is not None:
            raise ValueError(f"a fork samples its own first token: {rid!r} has first_token set")
        if source is None or source.num_prompt != request.num_prompt_tokens:
            raise ForkUnavailableError(f"no prompt KV of {parent_id!r} to fork {rid!r} from on {self.worker_id}")
        if rid in self._slots:
            raise ValueError(f"duplicate request id {rid!r}")
        self._check_stream(request.stream_id)
        req = self._make_request(request)
        shared = source.block_ids[:-1]
        own = self.blocks.allocate(self._blocks_for_new_request(source.num_prompt, request.sampling.max_tokens)
                                   - len(shared))
        # (safe beside a step in flight: the parent writes that block only from position num_prompt on)
        self.runner.copy_block(source.block_ids[-1], own[0])
        self.blocks.fork(shared)
        source.remaining -= 1
        if source.remaining == 0:
            self._unpin(parent_id)
        req.block_ids = shared + own
        self._slots[rid] = _Slot(rid, [], SlotState.RUNNING, req=req, stream_id=request.stream_id)
        self.scheduler.add_running(req)
        self._notify()

    def _blocks_for_new_request(self, num_prompt_tokens: int, max_tokens: int) -> int:
        """The blocks a request holds here for its whole life (prompt + max_tokens, capped at the
        context length: decode never preempts); NoFreeBlocksError when it may not be admitted."""
        if len(self._slots) >= self.config.max_num_seqs:
            raise NoFreeBlocksError(f"{self.worker_id} holds max_num_seqs={self.config.max_num_seqs} requests")
        return self.blocks.blocks_for_tokens(min(num_prompt_tokens + max_tokens, self.max_model_len))

    def _unpin(self, parent_id: str) -> None:
        self.blocks.free(self._forks.pop(parent_id).block_ids)

    async def abort(self, request_id: str) -> bool:
        """Free everything the request holds (a running one at the next step boundary)."""
        slot = self._slots.get(request_id)
        if slot is None:
            return False
        if slot.state is not SlotState.RUNNING:
            self._abort_slot(slot)
            return True
        done = asyncio.get_running_loop().create_future()
        self._aborts.setdefault(request_id, []).append(done)
        self._notify()
        await done
        return True

    # -- the loop --------------------------------------------------------------------------
    async def _engine_loop(self) -> None:
        while True:
            self._apply_aborts()  # receive (requests joined through generate())
            self._sweep_expired()
            batch = self.scheduler.schedule()  # schedule: one token per running request
            if batch is None:
                await self._wait_for_work(timeout_s=1.0)
                continue
            if self.scheduler.waiting:  # reservations cover max_tokens: this is a bug
                raise RuntimeError("decode scheduler preempted a request")
            await self.run_lm_step(batch)  # execute, post-process + send

    def _fail_batch(self, batch, exc: BaseException) -> None:
        """A step raised: its requests end with "error" (blocks freed); the others go on."""
        for req in batch.requests:
            slot = self._slots.pop(req.request_id, None)
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)  # frees the blocks
            if slot is not None:
                self.streams.emit(slot.stream_id, req.request_id, [], RequestStatus.FINISHED_ERROR.value)
        self.streams.flush()
        self._step_failed(exc, len(batch.requests))

    def _postprocess(self, batch, tokens: list[int | None]) -> None:
        emit = self.streams.emit
        for req, num_new, token in zip(batch.requests, batch.num_new_tokens, tokens):
            req.num_computed_tokens += num_new
            req.append_token(token)
            status = req.check_stop(self.max_model_len)
            slot = self._slots[req.request_id]
            if status is not None:
                self.scheduler.finish(req, status)  # frees the blocks
                del self._slots[req.request_id]
                self._num_finished += 1
            emit(slot.stream_id, req.request_id, [token], status.value if status else None,
                 req.output_logprobs[-1:] if req.sampling.logprobs is not None else None)
        self.streams.flush()  # send: one message per token stream for the whole step

    def _apply_aborts(self) -> None:
        aborts, self._aborts = self._aborts, {}
        for rid, waiters in aborts.items():
            slot = self._slots.get(rid)
            if slot is not None and slot.state is SlotState.RUNNING:
                self.scheduler.finish(slot.req, RequestStatus.FINISHED_ABORTED)  # frees the blocks
                del self._slots[rid]
                self.streams.emit(slot.stream_id, rid, [], RequestStatus.FINISHED_ABORTED.value)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(True)
        self.streams.flush()

    def _on_stream_lost(self, stream_id: str) -> None:
        """The router of ``stream_id`` is gone: its running requests stop at the next step."""
        lost = [s.request_id for s in self._slots.values() if s.state is SlotState.RUNNING and s.stream_id == stream_id]
        if lost:
            logger.warning("%s: token stream %s ended; aborting its %d running requests", self.worker_id, stream_id,
                           len(lost))
            for rid in lost:
                self._aborts.setdefault(rid, [])
            self._notify()

    def _sweep_expired(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for parent_id in [p for p, f in self._forks.items() if now > f.expires]:
            self._unpin(parent_id)
        for slot in list(self._slots.values()):
            idle = slot.state in (SlotState.RESERVED, SlotState.LANDED) and now - slot.created > self.reservation_ttl_s
            stale = slot.state is SlotState.EXPECTING and not slot.is_receiving and now > slot.expect_until
            if idle or stale:
                logger.warning("%s: freeing unused reservation %s (%s)", self.worker_id, slot.request_id,
                               slot.state.value)
                self._release(slot)

    # -- helpers ---------------------------------------------------------------------------
    def _abort_slot(self, slot: _Slot) -> None:
        """Abort a slot that is not running: free now, or when its transfer ends."""
        slot.is_aborted = True
        if not slot.is_receiving and slot.state is not SlotState.EXPECTING:
            self._release(slot)
        # EXPECTING without a receive yet: the sweep frees it if the sender never comes

    def _release(self, slot: _Slot) -> None:
        if slot.block_ids:
            self.blocks.free(slot.block_ids)
            slot.block_ids = []
        if self._slots.get(slot.request_id) is slot:
            del self._slots[slot.request_id]
        slot.landed.set()
        slot.has_first.set()

    def _make_request(self, request: DecodeRequest) -> Request:
        prompt = list(request.prompt_token_ids)
        forked = request.first_token is None  # its first step recomputes the prompt's last token
        if len(prompt) != request.num_prompt_tokens:  # only the length matters on this side (not in a fork)
            if forked:
                raise ValueError(f"a fork needs its whole prompt: {len(prompt)} of {request.num_prompt_tokens} tokens")
            prompt = [0] * request.num_prompt_tokens
        req = Request(request.request_id, prompt, request.sampling, eos_token_ids=frozenset(request.eos_token_ids),
                      output_token_ids=[] if forked else [request.first_token],
                      num_computed_tokens=request.num_prompt_tokens - forked,
                      position_delta=request.position_delta, num_sent_tokens=request.num_sent_tokens)
        if request.sampler_state is not None and req.sampler.generator is not None:
            req.sampler.generator.set_state(torch.frombuffer(bytearray(request.sampler_state), dtype=torch.uint8))
        return req

    def _on_loop_crash(self) -> None:
        for slot in list(self._slots.values()):
            if slot.state is SlotState.RUNNING:
                self.streams.emit(slot.stream_id, slot.request_id, [], RequestStatus.FINISHED_ERROR.value)
        self.streams.flush()
        for waiters in self._aborts.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(False)

    def _on_shutdown(self) -> None:
        self._on_loop_crash()
        self.receiver.close()
        self._recv_executor.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> dict[str, Any]:
        stats = self.receiver.stats()
        return {
            "num_running": len(self.scheduler.running),
            "num_reserved": sum(1 for s in self._slots.values() if s.state is not SlotState.RUNNING),
            "num_fork_sources": len(self._forks),
            "num_finished": self._num_finished,
            "kv_blocks_free": self.blocks.num_free_blocks,
            "kv_blocks_total": self.blocks.num_blocks,
            "max_model_len": self.max_model_len,
            "kv_transport": self.kv_config.transport,
            "kv_bytes_received": stats.num_bytes,
            "kv_transfers_ok": stats.num_ok,
            "kv_transfers_failed": stats.num_failed,
            "kv_pairs": stats.num_pairs,
            "num_token_streams": self.streams.num_streams,
        }

