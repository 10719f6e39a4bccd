import pytest

from cluster.engine.block_manager import BlockManager, NoFreeBlocksError


def test_allocate_and_free_roundtrip():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert len(set(a) | set(b)) == 8 and bm.num_free_blocks == 0
    bm.free(a)
    assert bm.num_free_blocks == 3 and bm.num_used_blocks == 5
    c = bm.allocate(3)
    assert set(c) == set(a)


def test_exhaustion_is_a_clear_error_and_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(3)
    with pytest.raises(NoFreeBlocksError, match="need 2 KV blocks, 1 free"):
        bm.allocate(2)
    assert bm.num_free_blocks == 1


def test_double_free_and_foreign_free_are_rejected():
    bm = BlockManager(num_blocks=4, block_size=4)
    ids = bm.allocate(2)
    bm.free(ids)
    with pytest.raises(ValueError):
        bm.free(ids)
    with pytest.raises(ValueError):
        bm.free([3, 3])
    assert bm.num_free_blocks == 4


def test_grow_allocates_only_missing_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    table: list[int] = []
    bm.grow(table, 1)
    assert len(table) == 1
    bm.grow(table, 4)
    assert len(table) == 1
    bm.grow(table, 9)
    assert len(table) == 3 and bm.num_used_blocks == 3
    assert bm.blocks_for_tokens(0) == 0 and bm.blocks_for_tokens(5) == 2


# -- reference counts and the prefix cache ------------------------------------------------------

def test_shared_block_is_freed_only_by_its_last_holder():
    bm = BlockManager(num_blocks=4, block_size=4)
    [a] = bm.allocate(1)
    bm.register(a, b"h0")
    assert bm.lookup([b"h0", b"h1"]) == [a]
    bm.share([a])  # a second request reuses it
    assert bm.num_used_blocks == 1 and bm.num_free_blocks == 3
    bm.free([a])
    assert bm.num_used_blocks == 1 and bm.num_cached_blocks == 0  # still held by the other
    bm.free([a])
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 1
    assert bm.num_free_blocks == 4  # cached blocks count as free
    with pytest.raises(ValueError):
        bm.free([a])  # nobody holds it


def test_forked_blocks_need_every_holder_to_free_them_and_only_held_blocks_fork():
    bm = BlockManager(num_blocks=4, block_size=4)
    blocks = bm.allocate(2)  # unregistered: forks share in-use blocks, no prefix hash needed
    bm.fork(blocks)
    bm.fork(blocks[:1])
    bm.free(blocks)
    assert bm.num_used_blocks == 2
    bm.free(blocks)
    assert bm.num_used_blocks == 1 and bm.num_free_blocks == 3
    bm.free(blocks[:1])
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 4
    with pytest.raises(ValueError):
        bm.fork(blocks[:1])  # nobody holds it any more


def test_cached_block_is_reused_and_leaves_the_free_count():
    bm = BlockManager(num_blocks=4, block_size=4)
    [a] = bm.allocate(1)
    bm.register(a, b"h0")
    bm.free([a])
    assert bm.can_allocate(4) and not bm.can_allocate(4, sharing=[a])  # sharing a takes it out of the pool
    bm.share(bm.lookup([b"h0"]))
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 3 and bm.num_used_blocks == 1
    assert a not in bm.allocate(3)  # never handed out while in use


def test_allocation_takes_free_blocks_first_then_evicts_least_recently_used():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b, c = bm.allocate(3)
    for blk, h in ((a, b"ha"), (b, b"hb"), (c, b"hc")):
        bm.register(blk, h)
    bm.free([b])
    bm.free([a])
    bm.free([c])  # cached, least recently used first: b, a, c
    [d] = bm.allocate(1)
    assert d not in (a, b, c)  # the truly free block goes first
    assert bm.allocate(1) == [b] and bm.lookup([b"hb"]) == []  # evicted: its hash is gone
    bm.share(bm.lookup([b"ha"]))  # a is touched (in use again) ...
    bm.free([a])  # ... and back, now the most recent
    assert bm.allocate(1) == [c] and bm.allocate(1) == [a]
    assert bm.num_free_blocks == 0 and bm.num_cached_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(1)


def test_a_sequence_is_evicted_tail_first():
    bm = BlockManager(num_blocks=3, block_size=4)
    table = bm.allocate(3)
    for i, blk in enumerate(table):
        bm.register(blk, bytes([i]))
    bm.free(table)
    assert bm.allocate(1) == [table[2]]  # the head (shared by more prompts) stays longest
    assert bm.lookup([bytes([0]), bytes([1]), bytes([2])]) == table[:2]


def test_register_keeps_the_first_block_of_a_hash_and_refuses_unheld_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = bm.allocate(2)
    bm.register(a, b"same")
    bm.register(b, b"same")  # computed the same prefix at once: b stays private
    bm.free([a, b])
    assert bm.num_cached_blocks == 1 and bm.lookup([b"same"]) == [a]
    with pytest.raises(ValueError):
        bm.register(b, b"other")  # not held by anyone
    with pytest.raises(ValueError):
        bm.share([b])  # holds no registered prefix


def test_never_hands_out_a_block_twice_under_churn():
    import random

    rng = random.Random(0)
    bm = BlockManager(num_blocks=16, block_size=4)
    holders: list[list[int]] = []
    for _ in range(2000):
        if holders and (rng.random() < 0.4 or not bm.can_allocate(3)):
            bm.free(holders.pop(rng.randrange(len(holders))))
        elif rng.random() < 0.3 and (hit := bm.lookup([bytes([rng.randrange(8)])])):
            bm.share(hit)
            holders.append(hit)
        else:
            table = bm.allocate(rng.randint(1, 3))
            assert not set(table) & {b for t in holders for b in t}, "a block in use was handed out"
            if rng.random() < 0.5:
                bm.register(table[0], bytes([rng.randrange(8)]))
            holders.append(table)
        held = {b for t in holders for b in t}
        assert bm.num_used_blocks == len(held)
        assert bm.num_free_blocks + bm.num_used_blocks == 16
    for t in holders:
        bm.free(t)
    assert bm.num_free_blocks == 16 and bm.num_used_blocks == 0
