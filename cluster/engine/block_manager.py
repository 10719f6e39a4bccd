"""``BlockManager``: owns which KV-cache blocks are free, shared or cached. Policy lives in the
schedulers.

Blocks are plain integer ids into the worker's cache tensor (see ``models/paged_attention.py``).
Every block is in exactly one of three states::

    free ──allocate──▶ in use (ref count >= 1) ──free, last ref, no hash──▶ free
      ▲                 │   ▲ register(hash): a FULL block whose KV is computed
      │                 │   └─share / fork: another request reuses it (ref + 1), read-only
      │                 └──free, last ref, hashed──▶ cached (ref 0, keeps its KV and hash, LRU)
      └────────allocate evicts the least recently used cached block (its hash dropped)────┘

Cached blocks count as free (``num_free_blocks``): an allocation takes truly free blocks first,
then evicts cached ones, oldest first. The manager never hands out a block that is in use and
refuses to free a block nobody holds, so a scheduler bug shows up as an exception here, never as
two sequences writing the same KV. Sharing (the prefix cache, ``cluster/engine/block_hash.py``)
only ever hands out registered full blocks, which nobody writes again.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence


class NoFreeBlocksError(RuntimeError):
    """Not enough free KV blocks for an allocation; the caller preempts, queues or rejects."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))  # no user, no hash
        self._refs: dict[int, int] = {}  # block -> number of holders (>= 1): in use
        self._cached: OrderedDict[int, None] = OrderedDict()  # no user, hashed; least recently used first
        self._hash_of: dict[int, bytes] = {}  # registered blocks (in use or cached) -> block hash
        self._block_of: dict[bytes, int] = {}  # block hash -> its block

    # -- counts ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: truly free + cached (evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request (shared blocks count once)."""
        return len(self._refs)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks nobody holds that keep reusable KV (a subset of ``num_free_blocks``)."""
        return len(self._cached)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int, sharing: Sequence[int] = ()) -> bool:
        """Whether ``num_blocks`` new blocks can be allocated after ``share(sharing)`` (cached
        blocks that get shared stop being free)."""
        return num_blocks + sum(b in self._cached for b in sharing) <= self.num_free_blocks

    # -- allocation ------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {num_blocks} KV blocks, {self.num_free_blocks} free")
        ids = []
        for _ in range(num_blocks):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently used cached block: its KV is about to be overwritten
                b, _ = self._cached.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
            self._refs[b] = 1
            ids.append(b)
        return ids

    def grow(self, block_ids: list[int], num_tokens: int) -> None:
        """Append blocks to ``block_ids`` (in place) until they hold ``num_tokens`` tokens."""
        missing = self.blocks_for_tokens(num_tokens) - len(block_ids)
        if missing > 0:
            block_ids.extend(self.allocate(missing))

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block. A block nobody holds any more becomes cached if it
        is registered (reusable KV), free otherwise."""
        bad = [b for b in block_ids if b not in self._refs]
        if bad or len(set(block_ids)) != len(block_ids):
            raise ValueError(f"freeing KV blocks that are not allocated (or twice): {bad or block_ids}")
        # Last block first: a sequence's tail is evicted before its head, which more requests share.
        for b in reversed(block_ids):
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            del self._refs[b]
            if b in self._hash_of:
                self._cached[b] = None
            else:
                self._free.append(b)

    def fork(self, block_ids: Sequence[int]) -> None:
        """Take one more reference to blocks in use: ``n`` samples of one prompt share its KV (a
        block is written by nobody once it is shared, see ``DecodeWorker.fork``); a KV transfer
        holds the blocks it reads until it ends (``PrefillWorker._start_ship``)."""
        bad = [b for b in block_ids if b not in self._refs]
        if bad:
            raise ValueError(f"forking KV blocks that are not allocated: {bad}")
        for b in block_ids:
            self._refs[b] += 1

    # -- prefix cache ----------------------------------------------------------------------
    def register(self, block_id: int, block_hash: bytes) -> None:
        """``block_id`` (held, full, KV computed) holds the block ``block_hash`` names: later
        requests may share it. A hash already registered keeps its first block (two requests
        computed the same prefix at once); a block registered already keeps its hash."""
        if block_id not in self._refs:
            raise ValueError(f"registering KV block {block_id}, which is not allocated")
        if block_hash in self._block_of or block_id in self._hash_of:
            return
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id

    def lookup(self, block_hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest run of ``block_hashes``, from the first, that are cached or
        in use (changes nothing; ``share`` takes them)."""
        ids = []
        for h in block_hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            ids.append(b)
        return ids

    def share(self, block_ids: Sequence[int]) -> None:
        """Take a reference to registered blocks (from ``lookup``) for one more request."""
        unknown = [b for b in block_ids if b not in self._hash_of]
        if unknown:
            raise ValueError(f"sharing KV blocks that hold no registered prefix: {unknown}")
        for b in block_ids:
            if b in self._cached:
                del self._cached[b]
                self._refs[b] = 1
            else:
                self._refs[b] += 1
