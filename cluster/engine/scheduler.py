"""``Scheduler``: decides which requests run in the next step and how many tokens each.

One policy for every engine role (vLLM v1 style, token-budgeted):

1. running requests that are decoding get one token each (oldest first); when the cache has no
   block for a decode, the newest running request is preempted (blocks freed, recomputed later);
2. running requests part-way through a chunked prefill get their next chunk;
3. waiting requests are admitted FCFS while the token budget, ``max_num_seqs`` and free blocks
   allow; a request is admitted with blocks for its whole prompt, so an admitted prefill can never
   stall for lack of blocks.

Prefix caching (``enable_prefix_caching``): once a step has computed a FULL block, ``mark_computed``
registers it under its chain hash (``block_hash.py``: tokens + media content hashes + the hash of
everything before it). Admission looks the prompt's block hashes up; the longest run of known
blocks becomes the request's first blocks (shared, read-only) and its ``num_computed_tokens``::

    prompt   [ blk 0 | blk 1 | blk 2 | blk 3 |  tail  ]
    cached   [  A    |  B    |  C    ]                     A, B, C: shared (ref count + 1)
    computed                          [ blk 3 |  tail  ]  new private blocks; the last prompt
                                                           token is always computed (its logits)

The run is capped at ``(num_tokens - 1) // block_size`` blocks, so at least one token is left to
compute; a request only ever writes into its private blocks. Freeing drops references; a
registered block nobody holds stays cached (evictable, LRU) in the ``BlockManager``.

Decode rows come first in the batch and prefill rows after, so attention can treat the
single-token rows as one group (see ``models/paged_attention.py``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cluster.engine.block_hash import extend_block_hashes
from cluster.engine.block_manager import BlockManager
from cluster.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests in the running batch
    max_num_batched_tokens: int = 2048  # new tokens per step (prefill chunk size bound)
    max_model_len: int = 4096  # prompt + output tokens of one request
    enable_prefix_caching: bool = False  # share computed full KV blocks between requests with the same prefix


@dataclass
class ScheduledBatch:
    requests: list[Request]
    num_new_tokens: list[int]  # per request: tokens whose KV this step computes

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        capacity = block_manager.num_blocks * block_manager.block_size
        if config.max_model_len > capacity:
            # A lone request could then outgrow the cache and preempt itself forever.
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the KV cache ({capacity} tokens)")
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Prefix cache counters (admissions with prefix caching on, re-admissions included):
        self.num_prefix_query_tokens = 0  # tokens of the admitted requests
        self.num_prefix_hit_tokens = 0  # of those, served from cached blocks

    # -- queue management -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if self.blocks.blocks_for_tokens(req.num_tokens + 1) > self.blocks.num_blocks:
            raise ValueError(f"request {req.request_id} needs more KV blocks than the cache has")
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """A request whose KV is already in this cache (received from a prefill worker)."""
        assert req.block_ids and req.num_computed_tokens > 0
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Take a request out of the queues and free its blocks (idempotent)."""
        if req.status.is_finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.block_ids:
            self.blocks.free(req.block_ids)
            req.block_ids = []
        req.status = status

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- policy ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        budget = self.config.max_num_batched_tokens
        decodes: list[Request] = []
        prefills: list[tuple[Request, int]] = []

        # 1 + 2: requests already running, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending_tokens == 1:
                if not self._reserve(req, req.num_tokens):
                    break  # req itself was preempted
                decodes.append(req)
                budget -= 1
            else:
                n = min(req.num_pending_tokens, budget)
                prefills.append((req, n))
                budget -= n
            i += 1

        # 3: admit waiting requests FCFS.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached = self._cached_prefix(req)
            needed = self.blocks.blocks_for_tokens(req.num_tokens) - len(req.block_ids) - len(cached)
            if not self.blocks.can_allocate(needed, sharing=cached):
                break
            self.waiting.popleft()
            if self.config.enable_prefix_caching and not req.block_ids:
                self._take_cached_prefix(req, cached)
            self.blocks.grow(req.block_ids, req.num_tokens)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            n = min(req.num_pending_tokens, budget)
            prefills.append((req, n))
            budget -= n

        if not decodes and not prefills:
            return None
        return ScheduledBatch(
            requests=decodes + [r for r, _ in prefills],
            num_new_tokens=[1] * len(decodes) + [n for _, n in prefills],
        )

    # -- step results ------------------------------------------------------------------------
    def mark_computed(self, req: Request, num_new_tokens: int) -> None:
        """Record a step's result: ``num_new_tokens`` more of ``req``'s tokens have KV now. With
        prefix caching, the full blocks the step completed are registered for others to share."""
        req.num_computed_tokens += num_new_tokens
        if not self.config.enable_prefix_caching:
            return
        size = self.blocks.block_size
        extend_block_hashes(req, size, req.num_computed_tokens)
        num_full = min(len(req.block_hashes), req.num_computed_tokens // size)  # hashes may stop early (media)
        for i in range(req.num_registered_blocks, num_full):
            self.blocks.register(req.block_ids[i], req.block_hashes[i])
        req.num_registered_blocks = max(req.num_registered_blocks, num_full)

    # -- prefix cache ------------------------------------------------------------------------
    def _cached_prefix(self, req: Request) -> list[int]:
        """Cached blocks matching the longest run of ``req``'s full blocks, leaving >= 1 token."""
        if not self.config.enable_prefix_caching or req.block_ids:
            return []
        size = self.blocks.block_size
        max_blocks = (req.num_tokens - 1) // size  # the last token is always computed: its logits
        extend_block_hashes(req, size, max_blocks * size)
        return self.blocks.lookup(req.block_hashes[:max_blocks])

    def _take_cached_prefix(self, req: Request, cached: list[int]) -> None:
        self.blocks.share(cached)
        req.block_ids = list(cached)
        req.num_computed_tokens = req.num_cached_tokens = len(cached) * self.blocks.block_size
        req.num_registered_blocks = len(cached)
        self.num_prefix_query_tokens += req.num_tokens
        self.num_prefix_hit_tokens += req.num_cached_tokens

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        """Make ``req`` hold blocks for ``num_tokens``, preempting the newest running requests
        if needed. Returns False when ``req`` itself had to be preempted."""
        while self.blocks.blocks_for_tokens(num_tokens) - len(req.block_ids) > self.blocks.num_free_blocks:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        self.blocks.grow(req.block_ids, num_tokens)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = req.num_registered_blocks = 0  # recompute prompt + outputs so far when readmitted
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
