"""``BlockManager``: owns which KV-cache blocks are free. Policy lives in the schedulers.

Blocks are plain integer ids into the worker's cache tensor (see ``models/paged_attention.py``).
The manager never hands out a block twice and refuses to free a block it did not hand out, so a
scheduler bug shows up as an exception here, never as two sequences writing the same KV.
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocksError(RuntimeError):
    """Not enough free KV blocks for an allocation; the caller preempts, queues or rejects."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._used)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise NoFreeBlocksError(f"need {num_blocks} KV blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(num_blocks)]
        self._used.update(ids)
        return ids

    def grow(self, block_ids: list[int], num_tokens: int) -> None:
        """Append blocks to ``block_ids`` (in place) until they hold ``num_tokens`` tokens."""
        missing = self.blocks_for_tokens(num_tokens) - len(block_ids)
        if missing > 0:
            block_ids.extend(self.allocate(missing))

    def free(self, block_ids: list[int]) -> None:
        bad = [b for b in block_ids if b not in self._used]
        if bad or len(set(block_ids)) != len(block_ids):
            raise ValueError(f"freeing KV blocks that are not allocated (or twice): {bad or block_ids}")
        for b in block_ids:
            self._used.remove(b)
            self._free.append(b)
