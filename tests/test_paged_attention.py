"""Paged attention against dense causal attention, for every way a step groups its sequences, on
every attention backend this machine can run."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from models.attention_backend import backends_for, make_attention_backend
from models.paged_attention import KVCacheSpec, _partition

CPU_BACKENDS = backends_for("cpu")

BLOCK, HKV, H, D = 4, 2, 4, 8


def _reference(q_all, k_all, v_all, start):
    """Dense attention of one sequence: queries at positions start.. over keys 0..pos."""
    q_len, kv_len = q_all.shape[0], k_all.shape[0]
    mask = torch.arange(kv_len)[None, :] <= (start + torch.arange(q_len))[:, None]
    out = F.scaled_dot_product_attention(q_all.transpose(0, 1)[None], k_all.transpose(0, 1)[None],
                                         v_all.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def _run_step(seqs, seed=0, backend="torch", attention=None):
    """seqs: (query_len, context_len) per sequence. Pre-fills each sequence's cached prefix, runs
    one packed step and checks every row against the dense reference."""
    attention = attention or make_attention_backend(backend)
    gen = torch.Generator().manual_seed(seed)
    spec = KVCacheSpec(1, 1600, BLOCK, HKV, D, torch.float32)
    cache = spec.allocate()[0]
    free = list(range(spec.num_blocks))
    random.Random(seed).shuffle(free)  # block tables far from contiguous
    tables, keys, values, qs = [], [], [], []
    for q_len, ctx in seqs:
        table = [free.pop() for _ in range(-(-ctx // BLOCK))]
        k = torch.randn(ctx, HKV, D, generator=gen)
        v = torch.randn(ctx, HKV, D, generator=gen)
        for p in range(ctx - q_len):  # the cached prefix, written as earlier steps would have
            cache[0, table[p // BLOCK], p % BLOCK], cache[1, table[p // BLOCK], p % BLOCK] = k[p], v[p]
        tables.append(table)
        keys.append(k)
        values.append(v)
        qs.append(torch.randn(q_len, H, D, generator=gen))
    meta = attention.build([s[0] for s in seqs], [s[1] for s in seqs], tables, BLOCK)
    new_k = torch.cat([k[ctx - q_len:] for k, (q_len, ctx) in zip(keys, seqs)])
    new_v = torch.cat([v[ctx - q_len:] for v, (q_len, ctx) in zip(values, seqs)])
    out = meta.attend(torch.cat(qs), new_k, new_v, cache)
    row = 0
    for (q_len, ctx), q, k, v in zip(seqs, qs, keys, values):
        expected = _reference(q, k, v, ctx - q_len)
        torch.testing.assert_close(out[row: row + q_len], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(meta.positions[row: row + q_len], torch.arange(ctx - q_len, ctx))
        row += q_len
    return meta


@pytest.mark.parametrize("seqs", [
    [(1, 5)],  # one decode token
    [(9, 9)],  # one short fresh prefill (the padded, masked kernel)
    [(300, 300)],  # one long fresh prefill: the mask-free causal kernel
    [(6, 13)],  # a prefill chunk after a cached prefix
    [(1, 3), (1, 900), (1, 40), (1, 1000), (1, 7)],  # decode of mixed lengths: several groups
    [(1, 12), (7, 7), (1, 600), (5, 21), (3, 3), (1, 30)],  # decode and prefill interleaved
    [(2, 700), (280, 280), (1, 5), (6, 6), (40, 900), (1, 650)],  # every kind of group at once
])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_paged_attention_matches_dense(seqs, backend):
    _run_step(seqs, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_backend_serves_steps_of_growing_and_shrinking_size(backend):
    """Its reusable buffers neither leak one step's KV into the next nor break when a step
    needs more (or less) than the last."""
    attention = make_attention_backend(backend)
    for i, seqs in enumerate([[(1, 5)], [(1, 900), (1, 40)] * 3, [(3, 3)], [(1, 1000), (7, 700)], [(1, 9)]]):
        _run_step(seqs, seed=i, attention=attention)


def test_auto_and_unknown_backends():
    assert make_attention_backend("auto").name == CPU_BACKENDS[0]
    with pytest.raises(ValueError, match="unknown attention backend"):
        make_attention_backend("nope")


def test_decode_groups_bound_padding_and_keep_every_row():
    ctx = [3, 900, 40, 1000, 7, 950, 230, 200]
    meta = _run_step([(1, c) for c in ctx], seed=1)
    groups = _partition([1] * len(ctx), ctx)
    assert sorted(b for g in groups for b in g) == list(range(len(ctx)))
    for g in groups:  # padding each member to the longest stays within the bound
        longest = max(ctx[b] for b in g)
        assert all(longest - ctx[b] <= max(256, longest // 4) for b in g)
    # The long ones attend together, the short ones together: a batch of chats is not padded to 1k.
    assert sorted(sorted(ctx[b] for b in g) for g in groups) == [[3, 7, 40, 200, 230], [900, 950, 1000]]
    assert len(meta.groups) == 2


def test_long_fresh_prefills_run_alone_and_the_rest_group_by_length():
    query_lens = [300, 1, 8, 4, 6, 400, 20]
    context_lens = [300, 20, 8, 10, 30, 400, 1000]
    groups = _partition(query_lens, context_lens)
    assert [0] in groups and [5] in groups  # long fresh prefills: one each, mask-free
    assert sorted(map(sorted, groups)) == [[0], [1], [2, 3, 4], [5], [6]]
    # short fresh prefills batch with continuing chunks of similar length, far from the 1k one
