"""Paged KV cache layout and varlen attention over it, in plain PyTorch.

Cache layout (one tensor per worker, all layers):

    kv: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
              K=0/V=1 ─┘      │           │
                       block id ┘           └ token offset inside the block

A token at logical position ``p`` of a sequence lives in block ``block_table[p // block_size]`` at
offset ``p % block_size``; its *slot* is ``block_id * block_size + offset`` (an index into the
cache viewed as ``[num_blocks * block_size, num_kv_heads, head_dim]``).

One forward step processes a *packed* batch: the new tokens of B sequences concatenated into T
rows (prefill chunks and single decode tokens alike). Each sequence has ``query_len`` new tokens
and ``context_len`` tokens of KV after the step (prefix already cached + the new ones).

This is the ``torch`` attention backend (``models.attention_backend``), on any device torch
runs on. Attention runs per *group* of sequences: the group's KV is gathered a whole block at a
time (``index_select`` of its block tables: contiguous block_size-token copies, not one copy per
token) into a padded ``[B, max_blocks * block_size]`` view, and ``scaled_dot_product_attention``
runs over it with a causal-with-offset mask; padded rows are discarded. Padding is the cost of
this kernel, so the groups keep it small: prefill chunks and decode tokens never share a group,
and sequences are grouped by context length (one 2k-token image request in a batch of short
chats does not pad every chat to 2k). A long prefill starting at position 0 runs alone with no
mask: SDPA's causal kernel skips the blocks above the diagonal.

The gathers land in two buffers the backend keeps (grown to the largest group seen), not in new
tensors: a decode step's gathered KV is megabytes per layer, and fresh memory of that size is
fresh pages from the kernel every time (page faults, zeroing, cold caches) — that cost more than
the copy itself. In a decode group the queries of one KV head attend as rows of one matrix
(``[B, Hkv, heads per KV head, D]``), so each KV head's keys are read once, not once per query head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.attention_backend import AttentionBackend, StepAttention


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of one worker's paged KV cache."""

    num_layers: int
    num_blocks: int
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    def allocate(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(
            self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim,
            dtype=self.dtype, device=device,
        )


@dataclass
class AttentionGroup:
    """Sequences attended together; their new tokens are ``rows`` of the packed batch."""

    rows: slice | torch.Tensor  # rows of the batch (a slice when contiguous, else int64 indices)
    block_tables: torch.Tensor  # [B * max_blocks] int64, block ids, row-major (0 where padded)
    attn_mask: torch.Tensor | None  # [B, 1, max_q, max_blocks * block_size] bool; None: plain causal
    query_index: torch.Tensor | None  # [rows] row of each new token in the padded [B * max_q] query
    batch_size: int
    max_q: int


# Sequences share a group while padding each to the group's longest context wastes at most this
# many tokens or a quarter of the longest: a group costs a few kernel launches per layer, about
# what attending ~256 tokens of padding costs on CPU.
GROUP_PAD_TOKENS = 256
# A fresh prefill this long runs alone on the causal kernel; shorter ones batch (32 prompts of 50
# tokens in one padded call beat 32 calls).
PLAIN_CAUSAL_MIN_TOKENS = 256


class TorchPagedAttention(AttentionBackend):
    """Block gathers + ``scaled_dot_product_attention``, with the gather buffers it reuses."""

    name = "torch"

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__(device)
        self._buffers: dict[tuple, torch.Tensor] = {}  # (half, dtype) -> flat gather buffer

    def build(self, query_lens, context_lens, block_tables, block_size) -> "AttentionMetadata":
        return AttentionMetadata.build(query_lens, context_lens, block_tables, block_size, self.device, backend=self)

    def gather(self, layer_cache: torch.Tensor, half: int, index: torch.Tensor) -> torch.Tensor:
        """``layer_cache[half][index]`` ([n, block_size, Hkv, D]) in this backend's buffer for
        ``half``: valid until the next gather of that half."""
        src = layer_cache[half]
        shape = (index.numel(), *src.shape[1:])
        numel = shape[0] * src[0].numel()
        key = (half, src.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(max(numel, 2 * (buf.numel() if buf is not None else 0)),
                                                   dtype=src.dtype, device=src.device)
        out = buf[:numel].view(shape)
        torch.index_select(src, 0, index, out=out)
        return out


@dataclass
class AttentionMetadata(StepAttention):
    """Everything attention needs for one packed step; built once, shared by every layer."""

    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot where each new token's K/V is written
    groups: list[AttentionGroup]
    backend: TorchPagedAttention | None = None  # its gather buffers (None: gather into new tensors)

    def attend(self, q, k, v, layer_cache) -> torch.Tensor:
        return paged_attention(q, k, v, layer_cache, self)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        backend: TorchPagedAttention | None = None,
    ) -> "AttentionMetadata":
        """Build the step's metadata from per-sequence lengths and block tables.

        ``context_lens[b]`` counts the KV of sequence b *after* this step, so its new tokens sit at
        positions ``context_lens[b] - query_lens[b] ... context_lens[b] - 1``. Rows are packed in
        the order given.
        """
        assert len(query_lens) == len(context_lens) == len(block_tables)
        row_starts = [0]
        for n in query_lens:
            row_starts.append(row_starts[-1] + n)
        positions = torch.empty(row_starts[-1], dtype=torch.int64)
        slot_mapping = torch.empty(row_starts[-1], dtype=torch.int64)
        groups = []
        for seqs in _partition(query_lens, context_lens):
            group, rows, pos, slots = _build_group(
                [query_lens[b] for b in seqs], [context_lens[b] for b in seqs],
                [block_tables[b] for b in seqs], block_size, [row_starts[b] for b in seqs], device)
            positions[rows], slot_mapping[rows] = pos, slots
            groups.append(group)
        return cls(positions.to(device), slot_mapping.to(device), groups, backend)


def _partition(query_lens: list[int], context_lens: list[int]) -> list[list[int]]:
    """Sequence indices per attention group: a long prefill chunk that starts at position 0 alone
    (it gets the mask-free causal kernel), the other prefill chunks and the decode tokens each by
    context length (``_by_length``)."""
    prefill = [b for b, n in enumerate(query_lens) if n > 1]
    alone = [b for b in prefill if context_lens[b] == query_lens[b] >= PLAIN_CAUSAL_MIN_TOKENS]
    rest = [b for b in prefill if b not in alone]
    decode = [b for b, n in enumerate(query_lens) if n == 1]
    return [[b] for b in alone] + _by_length(rest, context_lens) + _by_length(decode, context_lens)


def _by_length(seqs: list[int], context_lens: list[int]) -> list[list[int]]:
    """``seqs`` split into groups of similar context length (see GROUP_PAD_TOKENS)."""
    groups: list[list[int]] = []
    for b in sorted(seqs, key=lambda b: -context_lens[b]):
        if groups:
            longest = context_lens[groups[-1][0]]
            if longest - context_lens[b] <= max(GROUP_PAD_TOKENS, longest // 4):
                groups[-1].append(b)
                continue
        groups.append([b])
    return groups


def _build_group(query_lens, context_lens, block_tables, block_size, row_starts, device):
    num_seqs = len(query_lens)
    max_q = max(query_lens)
    max_blocks = max(max(len(t) for t in block_tables), 1)
    q_lens = torch.tensor(query_lens, dtype=torch.int64)
    ctx_lens = torch.tensor(context_lens, dtype=torch.int64)
    starts = ctx_lens - q_lens  # [B] first new position

    # Rows of the packed batch, positions of the new tokens: [rows].
    seq_of_row = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
    row_in_seq = torch.arange(int(q_lens.sum())) - torch.repeat_interleave(torch.cumsum(q_lens, 0) - q_lens, q_lens)
    positions = starts[seq_of_row] + row_in_seq
    contiguous = all(row_starts[b + 1] == row_starts[b] + query_lens[b] for b in range(num_seqs - 1))
    if contiguous:
        rows = slice(row_starts[0], row_starts[0] + int(q_lens.sum()))
    else:
        rows = torch.tensor(row_starts, dtype=torch.int64)[seq_of_row] + row_in_seq

    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int64)
    for b, table in enumerate(block_tables):
        tables[b, : len(table)] = torch.tensor(table, dtype=torch.int64)
    slot_mapping = tables[seq_of_row, positions // block_size] * block_size + positions % block_size

    plain_causal = num_seqs == 1 and context_lens[0] == query_lens[0]
    mask = None
    if not plain_causal:  # query i of sequence b (position starts[b] + i) sees keys 0 .. starts[b] + i
        kv_pos = torch.arange(max_blocks * block_size)
        q_pos = starts[:, None] + torch.arange(max_q)[None, :]  # [B, max_q]
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, :] < ctx_lens[:, None])[:, None, :]
        mask = mask[:, None].to(device)
    padded = num_seqs > 1 and max_q > 1
    group = AttentionGroup(
        rows=rows if contiguous else rows.to(device),
        block_tables=tables.view(-1).to(device),
        attn_mask=mask,
        query_index=(seq_of_row * max_q + row_in_seq).to(device) if padded else None,
        batch_size=num_seqs,
        max_q=max_q,
    )
    return group, rows, positions, slot_mapping  # rows: on the CPU, for the step's packed tensors


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    layer_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Write this step's K/V into the cache, then attend over each sequence's cached KV."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_flat = layer_cache[0].view(-1, num_kv_heads, head_dim)  # [slots, Hkv, D], a view
    v_flat = layer_cache[1].view(-1, num_kv_heads, head_dim)
    k_flat[meta.slot_mapping] = k.to(k_flat.dtype)
    v_flat[meta.slot_mapping] = v.to(v_flat.dtype)
    backend = meta.backend
    if len(meta.groups) == 1 and isinstance(meta.groups[0].rows, slice):
        return _attend_group(q, layer_cache, meta.groups[0], backend)
    out = torch.empty_like(q)
    for g in meta.groups:
        if isinstance(g.rows, slice):
            out[g.rows] = _attend_group(q[g.rows], layer_cache, g, backend)
        else:
            out.index_copy_(0, g.rows, _attend_group(q.index_select(0, g.rows), layer_cache, g, backend))
    return out


def _attend_group(q, layer_cache, g: AttentionGroup, backend: TorchPagedAttention | None) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = layer_cache.shape[-2]
    # [B * max_blocks, block_size, Hkv, D] -> [B, Hkv, max_blocks * block_size, D]
    if backend is not None:
        keys, values = backend.gather(layer_cache, 0, g.block_tables), backend.gather(layer_cache, 1, g.block_tables)
    else:
        keys, values = layer_cache[0].index_select(0, g.block_tables), layer_cache[1].index_select(0, g.block_tables)
    keys = keys.view(g.batch_size, -1, num_kv_heads, head_dim).transpose(1, 2).to(q.dtype)
    values = values.view(g.batch_size, -1, num_kv_heads, head_dim).transpose(1, 2).to(q.dtype)
    if g.max_q == 1 and g.attn_mask is not None:  # decode: a KV head's query heads are rows of one query
        queries = q.view(g.batch_size, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=g.attn_mask)  # [B, Hkv, G, D]
        return out.reshape(-1, num_heads, head_dim)
    if g.query_index is None:  # one sequence, or one token per sequence: no query padding
        queries = q.view(g.batch_size, -1, num_heads, head_dim)
    else:
        queries = q.new_zeros(g.batch_size * g.max_q, num_heads, head_dim)
        queries[g.query_index] = q
        queries = queries.view(g.batch_size, g.max_q, num_heads, head_dim)
    if g.attn_mask is None:  # one fresh sequence: its keys are exactly its queries' positions
        keys, values = keys[:, :, : q.shape[0]], values[:, :, : q.shape[0]]
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys, values, attn_mask=g.attn_mask, is_causal=g.attn_mask is None,
        enable_gqa=True,
    )  # [B, H, max_q, D]
    out = out.transpose(1, 2).reshape(-1, num_heads, head_dim)
    return out if g.query_index is None else out[g.query_index]
