"""Block pool: ref counts, prefix keys, LRU eviction among free blocks, counters."""
from __future__ import annotations

import pytest

from srlm_engine.engine.blocks import BlockPool


def commit_all(pool, blocks, tokens):
    parent = None
    for i, b in enumerate(blocks):
        parent = pool.commit(b, parent, tokens[i * pool.block_size:(i + 1) * pool.block_size])


def test_lookup_hits_full_blocks_of_the_same_prefix_only():
    pool = BlockPool(8, 4)
    toks = list(range(10))  # 2 full blocks + 2
    blocks = pool.allocate(3)
    commit_all(pool, blocks[:2], toks)
    assert pool.lookup(toks) == blocks[:2]
    assert pool.lookup(toks[:7]) == blocks[:1]          # second block not full in this prompt
    assert pool.lookup([99] + toks[1:]) == []            # first block differs: nothing matches
    assert pool.lookup(toks[:4] + [99, 5, 6, 7]) == blocks[:1]  # keys chain on the parent


def test_refcounts_and_lru_eviction():
    pool = BlockPool(4, 2)
    a = pool.allocate(2)
    commit_all(pool, a, [1, 2, 3, 4])
    pool.take(pool.lookup([1, 2, 3, 4, 5]))           # a second user of both blocks
    assert pool.ref[a[0]] == 2 and len(pool.free) == 2
    pool.release(a)
    assert len(pool.free) == 2                          # still held by the second user
    pool.release(a)
    assert len(pool.free) == 4                          # free, but still cached
    assert pool.lookup([1, 2, 3, 4]) == a
    # unkeyed free blocks are used before cached ones; then the least recently freed goes first
    b = pool.allocate(2)
    assert set(b).isdisjoint(a) and pool.lookup([1, 2, 3, 4]) == a
    c = pool.allocate(1)
    assert c == [a[1]] and pool.lookup([1, 2, 3, 4]) == [a[0]]  # the tail was freed first (reverse)
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate(2)
    assert pool.allocated == 5


def test_take_revives_a_free_cached_block_and_double_release_is_caught():
    pool = BlockPool(2, 2)
    a = pool.allocate(1)
    commit_all(pool, a, [7, 8])
    pool.release(a)
    pool.take(pool.lookup([7, 8, 9]))
    assert len(pool.free) == 1 and pool.ref[a[0]] == 1
    pool.release(a)
    with pytest.raises(AssertionError, match="released twice"):
        pool.release(a)


def test_token_arithmetic_and_slots():
    pool = BlockPool.for_tokens(10, 4)  # rounded up to whole blocks
    assert (pool.num_blocks, pool.capacity) == (3, 12)
    assert [pool.blocks_for(t) for t in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert pool.blocks_needed(1, 9) == 2 and pool.blocks_needed(3, 9) == 0
    table = [2, 0]  # token t sits in slot table[t // 4] * 4 + t % 4
    assert pool.slots(table, 2, 7) == [10, 11, 0, 1, 2]
    assert pool.slots(table, 2, 7, shared=4) == [-1, -1, 0, 1, 2]  # prefix hits are written already


def test_commit_full_keys_only_the_full_blocks_once():
    pool = BlockPool(4, 2)
    table, keys, toks = pool.allocate(3), [], [5, 6, 7, 8, 9]
    pool.commit_full(table, keys, toks, 3)
    assert len(keys) == 1 and pool.lookup(toks) == table[:1]
    pool.commit_full(table, keys, toks, 5)  # the third block holds one token: not keyed
    pool.commit_full(table, keys, toks, 5)  # and keying again adds nothing
    assert len(keys) == 2 and pool.lookup(toks) == table[:2]
    pool.release(table)
    assert pool.num_idle(table) == 3
    pool.take(pool.lookup(toks))
    assert pool.num_idle(table) == 1
