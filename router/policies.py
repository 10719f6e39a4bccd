"""Routing policies: which worker of a pool gets the next request. Pure functions over the
controller's ``PoolWorker`` records (router accounting), so they are unit-testable without Ray.

* **encoder**: media-hash affinity, then load. Each media item's ``content_hash`` has a preferred
  worker by rendezvous (highest-random-weight) hashing over the READY workers: when a worker
  joins or leaves, only the items it wins or owned move, so the encoder caches stay warm. A
  request's items vote; the winner takes the whole request (one encode call, one embeddings
  ref). When the winner's queue is longer than ``max_queue`` items, the least-loaded worker
  takes it instead (affinity never turns into a hot spot).
* **prefill**: fewest queued prompt tokens (then fewest requests, then id, for determinism).
* **decode**: most free KV blocks, then smallest running batch. Returned as a ranking: when the
  first choice cannot reserve, the router tries the next.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

from cluster.controller import PoolWorker


def rendezvous_score(key: str, worker_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{worker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def affine_worker(key: str, workers: Sequence[PoolWorker]) -> PoolWorker:
    return max(workers, key=lambda w: (rendezvous_score(key, w.worker_id), w.worker_id))


def pick_encoder(workers: Sequence[PoolWorker], content_hashes: Sequence[str], max_queue: int) -> PoolWorker:
    if not workers:
        raise LookupError("no ready encoder worker")
    if not content_hashes:
        return min(workers, key=lambda w: (w.inflight_tokens, w.worker_id))
    votes = Counter(affine_worker(h, workers).worker_id for h in content_hashes)
    first = affine_worker(content_hashes[0], workers).worker_id
    # Most votes wins; ties go to the first item's worker, then by id.
    winner_id = max(votes, key=lambda wid: (votes[wid], wid == first, wid))
    winner = next(w for w in workers if w.worker_id == winner_id)
    if winner.inflight_tokens <= max_queue:
        return winner
    return min(workers, key=lambda w: (w.inflight_tokens, w.worker_id))


def pick_prefill(workers: Sequence[PoolWorker]) -> PoolWorker:
    if not workers:
        raise LookupError("no ready prefill worker")
    return min(workers, key=lambda w: (w.inflight_tokens, w.inflight_requests, w.worker_id))


def rank_decode(workers: Sequence[PoolWorker], num_blocks_needed: int = 0) -> list[PoolWorker]:
    """Decode workers in the order to try: those believed to have room first, each group by most
    free blocks then smallest batch."""
    return sorted(workers, key=lambda w: (w.kv_blocks_free < num_blocks_needed, -w.kv_blocks_free,
                                          w.inflight_requests, w.worker_id))
