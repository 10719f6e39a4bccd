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
