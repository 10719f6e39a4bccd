"""Prefix-cache block hashes: one chain hash per FULL KV block of a request's tokens.

    hash(block i) = blake2b-256(hash(block i-1), token ids of block i, media in block i)

"Media in block i" names every media item overlapping the block: where the overlap starts in the
block, the offset inside the item there, its length, and the item's content hash (the encoder
cache key: media bytes + preprocessing params). The placeholder token ids are the same for every
image, so the content hash is what tells two images apart; the parent hash makes a block's hash
name its whole prefix, so equal hashes mean equal KV. A block that overlaps a media item without
a content hash gets no hash, nor does any block after it: such a prompt is cached only up to there.

Everything is packed with explicit lengths (struct, little-endian), never Python's ``hash()``:
the hashes are the same in every process and run.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from cluster.engine.request import Request

ROOT = b"tessera-kv-prefix-v1"  # the parent of a request's first block


def hash_block(parent: bytes, token_ids: Sequence[int], media: Sequence[tuple[int, int, int, str]]) -> bytes:
    """One block's hash; ``media``: (start in block, offset in item, length, content hash) per
    overlapping item, in prompt order."""
    h = hashlib.blake2b(digest_size=32)
    h.update(struct.pack("<I", len(parent)))
    h.update(parent)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    h.update(struct.pack("<I", len(media)))
    for start, offset, length, content_hash in media:
        digest = content_hash.encode()
        h.update(struct.pack("<3qI", start, offset, length, len(digest)))
        h.update(digest)
    return h.digest()


def extend_block_hashes(req: Request, block_size: int, num_tokens: int) -> None:
    """Extend ``req.block_hashes`` to the full blocks of the request's first ``num_tokens``
    tokens (prompt, then outputs), stopping before a block with an unhashable media item."""
    num_full = num_tokens // block_size
    if len(req.block_hashes) >= num_full:
        return
    for i in range(len(req.block_hashes), num_full):
        lo, hi = i * block_size, (i + 1) * block_size
        media = []
        for slot in req.media:
            start, end = max(lo, slot.offset), min(hi, slot.offset + slot.length)
            if start < end:
                if not slot.content_hash:
                    return
                media.append((start - lo, start - slot.offset, end - start, slot.content_hash))
        parent = req.block_hashes[-1] if req.block_hashes else ROOT
        req.block_hashes.append(hash_block(parent, req.token_ids(lo, hi), media))
