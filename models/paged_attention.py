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
and ``context_len`` tokens of KV after the step (prefix already cached + the new ones). Attention
gathers each sequence's KV through its block table into a padded ``[B, max_kv]`` view and runs
``scaled_dot_product_attention`` with a causal-with-offset mask; the padded rows are discarded.
That is the whole kernel: one code path for prefill, chunked prefill and decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    """Sequences attended together: their new tokens are rows ``row_start:row_end`` of the batch.

    Decode sequences (one new token each) form one group and prefill chunks another, so a mixed
    step never pads 32 single-token queries to the length of one 2k-token prefill chunk.
    """

    row_start: int
    row_end: int
    query_index: torch.Tensor  # [rows] int64, row of each new token in the padded [B * max_q] query
    kv_slots: torch.Tensor  # [B, max_kv] int64, cache slot of each key position (0 where padded)
    attn_mask: torch.Tensor  # [B, 1, max_q, max_kv] bool, True where attention is allowed
    max_q: int

    @property
    def batch_size(self) -> int:
        return self.kv_slots.shape[0]


@dataclass
class AttentionMetadata:
    """Everything attention needs for one packed step; built once, shared by every layer."""

    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot where each new token's K/V is written
    groups: list[AttentionGroup]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """Build the step's metadata from per-sequence lengths and block tables.

        ``context_lens[b]`` counts the KV of sequence b *after* this step, so its new tokens sit at
        positions ``context_lens[b] - query_lens[b] ... context_lens[b] - 1``. Rows are packed in
        the order given; consecutive single-token sequences share a group, as do consecutive
        multi-token ones.
        """
        assert len(query_lens) == len(context_lens) == len(block_tables)
        positions, slots, groups = [], [], []
        row, b = 0, 0
        while b < len(query_lens):
            is_decode = query_lens[b] == 1
            e = b
            while e < len(query_lens) and (query_lens[e] == 1) == is_decode:
                e += 1
            group, pos, slot = _build_group(query_lens[b:e], context_lens[b:e], block_tables[b:e],
                                            block_size, row, device)
            groups.append(group)
            positions.append(pos)
            slots.append(slot)
            row, b = group.row_end, e
        return cls(
            positions=torch.cat(positions).to(device),
            slot_mapping=torch.cat(slots).to(device),
            groups=groups,
        )


def _build_group(query_lens, context_lens, block_tables, block_size, row_start, device):
    num_seqs = len(query_lens)
    max_q, max_kv = max(query_lens), max(context_lens)
    q_lens = torch.tensor(query_lens, dtype=torch.int64)
    ctx_lens = torch.tensor(context_lens, dtype=torch.int64)
    starts = ctx_lens - q_lens  # [B] first new position

    # Positions of the new tokens, packed: [rows].
    seq_of_row = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
    row_in_seq = torch.arange(int(q_lens.sum())) - torch.repeat_interleave(torch.cumsum(q_lens, 0) - q_lens, q_lens)
    positions = starts[seq_of_row] + row_in_seq

    # Block tables padded to [B, max_blocks]; slot of every key position [B, max_kv].
    tables = torch.zeros(num_seqs, max(max(len(t) for t in block_tables), 1), dtype=torch.int64)
    for b, table in enumerate(block_tables):
        tables[b, : len(table)] = torch.tensor(table, dtype=torch.int64)
    kv_pos = torch.arange(max_kv)
    kv_valid = kv_pos[None, :] < ctx_lens[:, None]
    kv_slots = tables[:, kv_pos // block_size] * block_size + kv_pos % block_size
    kv_slots = torch.where(kv_valid, kv_slots, 0)
    slot_mapping = kv_slots[seq_of_row, positions]

    # Query row i of sequence b (position starts[b] + i) sees keys 0 .. starts[b] + i.
    q_pos = starts[:, None] + torch.arange(max_q)[None, :]  # [B, max_q]
    mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & kv_valid[:, None, :]
    group = AttentionGroup(
        row_start=row_start,
        row_end=row_start + int(q_lens.sum()),
        query_index=(seq_of_row * max_q + row_in_seq).to(device),
        kv_slots=kv_slots.to(device),
        attn_mask=mask[:, None].to(device),
        max_q=max_q,
    )
    return group, positions, slot_mapping


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
    outs = [_attend_group(q[g.row_start:g.row_end], k_flat, v_flat, g) for g in meta.groups]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _attend_group(q, k_flat, v_flat, g: AttentionGroup) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    keys = k_flat[g.kv_slots].transpose(1, 2).to(q.dtype)  # [B, Hkv, max_kv, D]
    values = v_flat[g.kv_slots].transpose(1, 2).to(q.dtype)
    if g.batch_size == 1:
        queries = q.unsqueeze(0)  # one sequence: no padding needed
    else:
        queries = q.new_zeros(g.batch_size * g.max_q, num_heads, head_dim)
        queries[g.query_index] = q
        queries = queries.view(g.batch_size, g.max_q, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys, values, attn_mask=g.attn_mask, enable_gqa=True
    )  # [B, H, max_q, D]
    out = out.transpose(1, 2).reshape(g.batch_size * g.max_q, num_heads, head_dim)
    return out if g.batch_size == 1 else out[g.query_index]
