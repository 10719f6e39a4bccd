"""``EncoderWorker``: media bytes -> embeddings, batched across requests, cached by content hash.

A media item's life inside the worker::

    encode([EncodeItem]) ── cache hit ───────────────────────────────▶ embeddings at once
           │ └─ same hash already queued/encoding: wait on that item's future (coalesced)
           ▼ miss
    queue ──(loop: wait up to batch_wait_ms for more, take <= max_batch_size items of one modality)
           ▼
    [model thread] decode_media (checks + PIL / soundfile) -> preprocess -> tower + projector
           ▼
    cache.put(content_hash) -> resolve the item's future -> encode() returns list[Tensor]

A queued item that no ``encode`` call waits for any more (each caller was cancelled: client
cancel, deadline, abort) is dropped before it is encoded; one already in a forward completes and
is cached.

``encode`` returns one CPU tensor ``[num_tokens, lm_hidden]`` per item, in order. A corrupt
item fails only the calls that sent it (``MediaError``); a tower failure fails its batch.
Items of concurrent ``encode`` calls share a forward, which is the point of the pool.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import torch

from cluster.config import EngineConfig
from cluster.contracts import EncodeItem
from cluster.engine.setup import resolve_engine_model
from cluster.engine.encoder_runner import EncoderRunner
from cluster.worker_base import BaseWorker
from encoder_pool.cache import EncoderCache
from models.loader import load_model
from models.processor import MultimodalProcessor
from cluster.request_types import MediaInput


@dataclass
class _Pending:
    item: EncodeItem
    future: asyncio.Future  # -> torch.Tensor [num_tokens, lm_hidden] CPU
    num_waiters: int = 1  # encode() calls waiting on this item (coalesced ones included)


class EncoderWorker(BaseWorker):
    pool = "encoder"

    def __init__(self, engine: EngineConfig, worker_id: str, *, max_batch_size: int = 16,
                 batch_wait_ms: float = 2.0, cache_max_bytes: int = 256 * 2**20, torch_threads: int = 1):
        super().__init__(worker_id, torch_threads)
        self.config = engine
        model_dir = resolve_engine_model(engine)
        self.model = load_model(model_dir, dtype=engine.torch_dtype, device=engine.device, parts=("encoders",))
        self.processor = MultimodalProcessor(model_dir, self.model.config)
        self.runner = EncoderRunner(self.model, self.processor, engine.device)
        self.limits = engine.limits.media()
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.cache = EncoderCache(cache_max_bytes)
        self._queue: list[_Pending] = []
        self._by_hash: dict[str, _Pending] = {}  # queued or encoding now, for coalescing
        self._num_encoding = 0
        self._num_coalesced = 0
        self._num_dropped = 0
        self._num_batches = 0
        self._num_encoded = 0
        self._encode_s = 0.0

    # -- API -------------------------------------------------------------------------------
    async def encode(self, items: list[EncodeItem]) -> list[torch.Tensor]:
        """Embeddings [num_tokens, lm_hidden] (CPU) per item, in order; raises MediaError."""
        self._ensure_loop()
        loop = asyncio.get_running_loop()
        futures = []
        waited: list[_Pending] = []  # the queued/encoding items this call waits on
        for item in items:
            cached = self.cache.get(item.content_hash)
            if cached is not None:
                fut = loop.create_future()
                fut.set_result(cached)
            elif item.content_hash in self._by_hash:
                pending = self._by_hash[item.content_hash]
                pending.num_waiters += 1
                waited.append(pending)
                fut = pending.future
                self._num_coalesced += 1
            else:
                pending = _Pending(item, loop.create_future())
                self._by_hash[item.content_hash] = pending
                self._queue.append(pending)
                waited.append(pending)
                fut = pending.future
            futures.append(fut)
        self._notify()
        try:
            # shield: one caller giving up must not cancel an item other callers share.
            return [await asyncio.shield(f) for f in futures]
        finally:
            self._stop_waiting(waited)

    def _stop_waiting(self, waited: list[_Pending]) -> None:
        """An ``encode`` call ended (answered, failed or cancelled). Queued items that nobody
        waits for any more are dropped: the router cancels the encode call of a request that is
        cancelled before its first token and frees its admission slot at once, so without this a
        storm of cancelled requests would pile up media here faster than they are encoded,
        unbounded by the router's admission limits, and delay every live request behind them."""
        for pending in waited:
            pending.num_waiters -= 1
        abandoned = {id(p) for p in waited if p.num_waiters <= 0 and not p.future.done()}
        if not abandoned:
            return
        kept = []
        for pending in self._queue:  # (items in the forward running now are not in the queue)
            if id(pending) in abandoned:
                self._by_hash.pop(pending.item.content_hash, None)
                pending.future.cancel()
                self._num_dropped += 1
            else:
                kept.append(pending)
        self._queue = kept

    # -- the loop --------------------------------------------------------------------------
    async def _engine_loop(self) -> None:
        while True:
            # receive: wait for items, then give concurrent callers a moment to add theirs
            if not self._queue:
                await self._wait_for_work()
                continue
            if len(self._queue) < self.max_batch_size and self.batch_wait_s > 0:
                await asyncio.sleep(self.batch_wait_s)
                if not self._queue:  # every item was dropped meanwhile (its callers were cancelled)
                    continue
            # schedule: the oldest items of one modality, up to the batch size
            batch = self._take_batch()
            # execute (model thread): decode + preprocess + tower
            self._num_encoding = len(batch)
            start = time.perf_counter()
            try:
                results = await self.run_step(self._encode_items, [p.item for p in batch])
            except Exception as exc:  # noqa: BLE001 — the tower failed: fail the whole batch
                results = [exc] * len(batch)
                self._step_failed(exc, len(batch))
            else:
                self._step_ok()
            self._encode_s += time.perf_counter() - start
            self._num_encoding = 0
            self._num_batches += 1
            # post-process + send: cache, resolve futures
            for pending, result in zip(batch, results):
                self._by_hash.pop(pending.item.content_hash, None)
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    self._num_encoded += 1
                    self.cache.put(pending.item.content_hash, result)
                    pending.future.set_result(result)

    def _take_batch(self) -> list[_Pending]:
        modality = _modality(self._queue[0].item)
        batch, rest = [], []
        for p in self._queue:
            (batch if len(batch) < self.max_batch_size and _modality(p.item) == modality else rest).append(p)
        self._queue = rest
        return batch

    def _encode_items(self, items: list[EncodeItem]) -> list[torch.Tensor | Exception]:
        """Model thread: decode each item (a bad one fails alone), encode the rest in one forward."""
        self.faults.hit("encode")
        results: list[torch.Tensor | Exception | None] = [None] * len(items)
        decoded, slots = [], []
        for i, item in enumerate(items):
            try:
                decoded.append(self.processor.decode_media(MediaInput(item.data, item.mime_type), self.limits))
                slots.append(i)
            except Exception as exc:  # noqa: BLE001 — MediaError, mostly
                results[i] = exc
        for i, emb in zip(slots, self.runner.encode(decoded)):
            results[i] = emb.detach().to("cpu").contiguous()
        return results

    def _on_loop_crash(self) -> None:
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(RuntimeError(f"encoder worker {self.worker_id} loop crashed"))
        self._queue.clear()

    def _on_shutdown(self) -> None:
        self._on_loop_crash()

    def _load(self) -> dict[str, Any]:
        return {
            "num_queued_items": len(self._queue),
            "num_encoding_items": self._num_encoding,
            "num_encoded_items": self._num_encoded,
            "num_coalesced_items": self._num_coalesced,
            "num_dropped_items": self._num_dropped,  # queued items dropped: every caller was cancelled
            "num_batches": self._num_batches,
            "encode_seconds": round(self._encode_s, 6),
            **self.cache.stats(),
        }


def _modality(item: EncodeItem) -> str:
    return MediaInput(item.data, item.mime_type).modality
