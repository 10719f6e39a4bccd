"""``PrefillWorker``: prompt (+ media embeddings) -> first token at once, then KV to decode.

A request's life inside the worker::

    prefill(PrefillRequest, embeddings, Reservation)        [streaming generator, one per request]
      │ Request(prompt, media=media_slots(runs, emb)) -> scheduler.add         WAITING
      ▼
    engine loop (one task):  aborts -> schedule -> execute (model thread) -> post-process
      │ admitted with blocks for the whole prompt, the first ones shared from the prefix
      │ cache when an earlier prompt began the same (tokens + media content hashes);
      │ chunked by max_num_batched_tokens, batched with other queued prompts     RUNNING
      │
      │ the step that computes the prompt's last chunk starts the ship task first
      │ (kv_transfer.stream_layers): it sends layer l as soon as the step has written it
      │ (LayerGate), while the model computes layer l + 1:
      │   decode.kv_expect(request_id, me) -> pair info    (decode now waits for this transfer)
      │   run_kv_transfer(my blocks -> reservation.block_ids[:n]), decode.kv_receive(ticket)
      │   (the task holds its own reference to the blocks and drops it when the transfer ends:
      │    success, failure, cancel; a prefix block shared with another request stays held by
      │    it; registered blocks nobody holds stay cached for later prompts)
      ▼ first token sampled: the request leaves the scheduler and drops its block references
    yield PrefillFirstToken(token)          <- TTFT: nothing below delays it
      │ (stream_layers off: the ship task starts only now, from the finished cache)
    yield KVShipped(num_bytes, seconds)     or raise KVTransferError
      (decode may already be running it: it admits a request the moment its KV lands)

Cancelling the generator before the first token removes the request at the next step boundary
(the engine loop is the only place blocks of scheduled requests are freed, so a step in flight
never writes into a freed block); a transfer already streaming runs to completion by itself. A
step that raises fails its gate, so a transfer waiting for one of its layers aborts at once.
When the first token ends a request that was not streamed (EOS, max_tokens=1, ...) nothing is
shipped and ``KVShipped(0, 0.0)`` follows; the decode worker ends such a request without KV.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from cluster.config import EngineConfig, KVTransferConfig
from cluster.contracts import KVShipped, PrefillFirstToken, PrefillRequest, Reservation
from cluster.engine.setup import build_lm_engine, resolve_engine_model
from cluster.engine.request import Request, RequestStatus, media_slots
from cluster.kv_transfer import KVTransferError, KVTransferMeta, LayerGate, iter_kv_layers, run_kv_transfer
from cluster.worker_base import BaseWorker, make_kv_endpoint
from models.loader import load_model


class PrefillWorker(BaseWorker):
    pool = "prefill"

    def __init__(self, engine: EngineConfig, worker_id: str, kv_transfer: KVTransferConfig | None = None, *,
                 max_concurrent_sends: int = 4, torch_threads: int = 1):
        super().__init__(worker_id, torch_threads)
        self.config = engine
        self.kv_config = kv_transfer or KVTransferConfig()
        model = load_model(resolve_engine_model(engine), dtype=engine.torch_dtype, device=engine.device,
                           parts=("language_model",))
        lm = build_lm_engine(engine, model)
        self.runner, self.blocks, self.scheduler, self.max_model_len = (
            lm.runner, lm.blocks, lm.scheduler, lm.max_model_len)
        self.device = torch.device(engine.device)
        self.sender = make_kv_endpoint("sender", self.kv_config.transport, worker_id,
                                       timeout_s=self.kv_config.timeout_s, host=self.kv_config.interface,
                                       device=engine.device, lanes=self.kv_config.lanes_per_pair)
        max_concurrent_sends = max(max_concurrent_sends, self.kv_config.lanes_per_pair)
        self._send_executor = ThreadPoolExecutor(max_concurrent_sends, thread_name_prefix=f"{worker_id}-kv")
        self._requests: dict[str, Request] = {}  # in the scheduler (waiting or mid-prefill)
        self._first_token: dict[str, asyncio.Future] = {}  # -> (token_id, its block ids, sampler state)
        self._aborts: set[str] = set()  # cancelled before their first token; applied between steps
        self._reservations: dict[str, Reservation] = {}  # where each queued request's KV goes
        self._ships: dict[str, asyncio.Task] = {}  # transfers streaming while the prompt's last chunk runs
        self._first_to_decode: set[str] = set()  # requests whose decode worker takes the first token from us
        self._num_shipping = 0
        self._num_prefilled = 0
        self._num_streamed = 0  # transfers started with the step that computed the prompt's last chunk
        self._transfer_ids = itertools.count()

    # -- API -------------------------------------------------------------------------------
    async def prefill(self, request: PrefillRequest, embeddings: list[torch.Tensor] | None,
                      reservation: Reservation):
        """Streaming generator: PrefillFirstToken, then KVShipped (or KVTransferError)."""
        self._ensure_loop()
        start = time.perf_counter()
        req = self._make_request(request, embeddings or [])
        rid = req.request_id
        future = asyncio.get_running_loop().create_future()
        self.scheduler.add(req)  # raises ValueError for a prompt larger than the whole cache
        self._requests[rid], self._first_token[rid] = req, future
        self._reservations[rid] = reservation
        if request.first_token_to_decode:
            self._first_to_decode.add(rid)
        self._notify()
        try:
            token_id, block_ids, state = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # token came as we were cancelled
                self.blocks.free(future.result()[1])
            else:
                self._aborts.add(rid)
                self._notify()
            raise
        finally:  # (a transfer already streaming goes on by itself and frees what it holds)
            del self._reservations[rid]
            self._first_to_decode.discard(rid)
            ship = self._ships.pop(rid, None)
        prefill_s = time.perf_counter() - start
        logprob = req.output_logprobs[0] if req.output_logprobs else None
        first = PrefillFirstToken(token_id, prefill_s, state, logprob)
        if ship is None and req.check_stop(self.max_model_len) is None:  # not streamed: send it now
            ship = self._start_ship(req, block_ids, reservation)
        self.blocks.free(block_ids)  # the request's own references (a transfer holds its own)
        yield first
        # (the first token may end a request whose transfer already streams: it completes anyway)
        yield KVShipped(0, 0.0) if ship is None else await asyncio.shield(ship)

    # -- the loop --------------------------------------------------------------------------
    async def _engine_loop(self) -> None:
        while True:
            self._apply_aborts()  # receive (new requests were added by prefill() directly)
            batch = self.scheduler.schedule()  # schedule: prompts, chunked under the token budget
            if batch is None:
                await self._wait_for_work()
                continue
            gate = self._stream_kv(batch) if self.kv_config.stream_layers else None
            await self.run_lm_step(batch, gate)  # execute, post-process + send (wake the generators)

    def _stream_kv(self, batch) -> LayerGate | None:
        """Start the KV transfer of each request whose last prompt chunk this step computes, fed
        layer by layer as the step writes it; the step's gate (None if it finishes no prompt)."""
        finishing = [req for req, n in zip(batch.requests, batch.num_new_tokens)
                     if req.num_computed_tokens + n == req.num_tokens and req.sampling.max_tokens > 1]
        if not finishing:
            return None
        gate = LayerGate(self.runner.spec.num_layers, self.device)
        for req in finishing:
            reservation = self._reservations.get(req.request_id)
            if reservation is not None:  # (None: its generator is gone; the abort comes next step)
                self._ships[req.request_id] = self._start_ship(req, list(req.block_ids), reservation, gate)
                self._num_streamed += 1
        return gate

    def _fail_batch(self, batch, exc: BaseException) -> None:
        """A step raised: its requests fail (blocks freed); queued ones and later steps go on."""
        for req in batch.requests:
            self._requests.pop(req.request_id, None)
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)  # frees its blocks
            future = self._first_token.pop(req.request_id, None)
            if future is not None and not future.done():
                future.set_exception(RuntimeError(f"prefill step failed on {self.worker_id}: "
                                                  f"{type(exc).__name__}: {exc}"))
        self._step_failed(exc, len(batch.requests))

    def _postprocess(self, batch, tokens: list[int | None]) -> None:
        for req, num_new, token in zip(batch.requests, batch.num_new_tokens, tokens):
            self.scheduler.mark_computed(req, num_new)  # (full blocks become shareable: prefix cache)
            if token is None:  # mid-prompt chunk: more next step
                continue
            req.append_token(token)
            # Prefill-only: the request leaves the scheduler; its blocks stay held for the send.
            block_ids, req.block_ids = req.block_ids, []
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
            del self._requests[req.request_id]
            future = self._first_token.pop(req.request_id)
            self._num_prefilled += 1
            if future.cancelled():
                self.blocks.free(block_ids)
                continue
            state = _sampler_state(req)  # (once: for the router and, when it waits, the decode worker)
            future.set_result((token, block_ids, state))
            if req.request_id in self._first_to_decode:  # decode waits for it: hand it over now
                self._first_to_decode.discard(req.request_id)
                decode = self._reservations[req.request_id].decode_actor
                ref = decode.kv_first_token.remote(req.request_id, token, state)
                ref.future().add_done_callback(lambda f: f.cancelled() or f.exception())  # (a gone decode: the router sees)

    def _apply_aborts(self) -> None:
        while self._aborts:
            rid = self._aborts.pop()
            req = self._requests.pop(rid, None)
            self._first_token.pop(rid, None)
            if req is not None:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)  # frees its blocks

    # -- KV shipping -----------------------------------------------------------------------
    def _start_ship(self, req: Request, block_ids: list[int], reservation: Reservation,
                    gate: LayerGate | None = None) -> asyncio.Task:
        """The task that ships ``block_ids`` (written, or being written by ``gate``'s step) to the
        reservation. It holds its own reference to the blocks (and frees it whatever happens), so
        the request may leave the scheduler, or fail, while the transfer runs."""
        self.blocks.fork(block_ids)
        ship = asyncio.get_running_loop().create_task(self._ship(req, block_ids, reservation, gate))
        ship.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if nobody waits
        return ship

    async def _ship(self, req: Request, block_ids: list[int], reservation: Reservation,
                    gate: LayerGate | None) -> KVShipped:
        start = time.perf_counter()
        self._num_shipping += 1
        try:
            decode = reservation.decode_actor
            peer_id = reservation.worker_id
            if len(reservation.block_ids) < len(block_ids):
                raise KVTransferError(f"reservation has {len(reservation.block_ids)} blocks, the prompt needs "
                                      f"{len(block_ids)}")
            # Tell decode a transfer is coming (it now keeps the blocks until it ends) and get
            # the pair's current info (a restarted decode worker has a new incarnation).
            info = await decode.kv_expect.remote(req.request_id, self.worker_id)
            self.sender.connect(peer_id, info)  # no-op when unchanged; opens nothing
            meta = KVTransferMeta.for_cache(
                self.runner.kv_cache, request_id=req.request_id,
                transfer_id=f"{req.request_id}/{self.worker_id}/{next(self._transfer_ids)}",
                src_block_ids=block_ids, dst_block_ids=reservation.block_ids[:len(block_ids)],
                num_tokens=req.num_prompt_tokens)
            layers = iter_kv_layers(self.runner.kv_cache, block_ids, gate, self.kv_config.timeout_s)
            if self.faults.enabled:  # (unwrapped, shm gathers straight from the cache into its ring)
                layers = self._faulty(layers)
            _, received = await self.run_blocking(
                run_kv_transfer, self.sender, peer_id, meta, layers,
                lambda ticket: decode.kv_receive.remote(req.request_id, ticket),
                executor=self._send_executor)
            num_bytes = await received  # decode confirms the KV is in its blocks
            return KVShipped(num_bytes, time.perf_counter() - start)
        except KVTransferError:
            raise
        except Exception as exc:  # noqa: BLE001 — a Ray error from decode, a bad reservation, ...
            raise KVTransferError(f"KV transfer to {reservation.worker_id} failed: {type(exc).__name__}: {exc}",
                                  transfer_id=req.request_id) from exc
        finally:
            self.blocks.free(block_ids)
            self._num_shipping -= 1

    def _faulty(self, layers):
        """The layers to send, with the ``kv_send`` fault point before each one."""
        for layer in layers:
            self.faults.hit("kv_send")
            yield layer

    async def kv_forget_peer(self, peer_id: str) -> None:
        """Decode worker ``peer_id`` left the pool: drop the pair with it (communicator, store
        connection). A transfer still on it fails; a later worker of that id pairs anew."""
        self.sender.forget(peer_id)

    # -- helpers ---------------------------------------------------------------------------
    def _make_request(self, request: PrefillRequest, embeddings: list[torch.Tensor]) -> Request:
        hashes = list(request.media_hashes) or [""] * len(embeddings)  # "": that media is never shared
        if request.request_id in self._first_token:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        slots = media_slots(request.media_runs, embeddings, hashes, self.device)
        return Request(request.request_id, list(request.prompt_token_ids), request.sampling, slots,
                       frozenset(request.eos_token_ids), mrope_positions=request.mrope_positions,
                       position_delta=request.position_delta, num_sent_tokens=request.num_sent_tokens)

    def _on_loop_crash(self) -> None:
        for future in self._first_token.values():
            if not future.done():
                future.set_exception(RuntimeError(f"prefill worker {self.worker_id} loop crashed"))

    def _on_shutdown(self) -> None:
        self._on_loop_crash()
        self.sender.close()
        self._send_executor.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> dict[str, Any]:
        stats = self.sender.stats()
        queued = list(self.scheduler.waiting) + list(self.scheduler.running)
        return {
            "num_queued_requests": len(queued),
            "num_queued_tokens": sum(r.num_pending_tokens for r in queued),
            "num_shipping": self._num_shipping,
            "num_prefilled": self._num_prefilled,
            "kv_blocks_free": self.blocks.num_free_blocks,
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_cached": self.blocks.num_cached_blocks,  # (free, but hold reusable prefix KV)
            "prefix_cache_query_tokens": self.scheduler.num_prefix_query_tokens,
            "prefix_cache_hit_tokens": self.scheduler.num_prefix_hit_tokens,
            "kv_transport": self.kv_config.transport,
            "kv_bytes_sent": stats.num_bytes,
            "kv_transfers_ok": stats.num_ok,
            "kv_transfers_failed": stats.num_failed,
            "kv_transfers_streamed": self._num_streamed,
            "kv_pairs": stats.num_pairs,
        }


def _sampler_state(req: Request) -> bytes | None:
    """The request's sampling generator after its first token (seeded sampling goes on from it)."""
    return req.sampler.generator.get_state().numpy().tobytes() if req.sampler.generator is not None else None
