"""``EncoderCache``: LRU of encoder outputs keyed by content hash, bounded by bytes.

The key is ``DecodedMedia.content_hash`` (blake2b of the media bytes keyed by the model's
preprocessing parameters), so the same image under a different preprocessing config misses. One
entry is one item's embeddings ``[num_tokens, lm_hidden]`` on the CPU. An item larger than the
whole budget is never stored. Only the worker's event loop touches it (no lock).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        """The cached tensor (and mark it most recent), counting a hit or a miss."""
        tensor = self._entries.get(key)
        if tensor is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.num_bytes -= old.numel() * old.element_size()
        self._entries[key] = tensor
        self.num_bytes += size
        while self.num_bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.numel() * evicted.element_size()
            self.evictions += 1

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_entries": len(self._entries),
                "cache_bytes": self.num_bytes, "cache_max_bytes": self.max_bytes, "cache_evictions": self.evictions}
