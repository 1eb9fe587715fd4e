"""Blocks on integers alone: allocation, sharing, and the prefix cache's keyed blocks (matched,
released to the cache, evicted least recently released first, tail before head)."""

from __future__ import annotations

import pytest

from pdserve.cluster.block_hash import extend_block_hashes
from pdserve.cluster.block_manager import BlockManager


def _keys(tokens: list[int], block_size: int = 4) -> list[bytes]:
    return extend_block_hashes([], tokens, block_size, len(tokens) // block_size)


def test_keys_chain_the_prefix():
    a = _keys(list(range(12)))
    assert a == _keys(list(range(12))) and len(set(a)) == 3
    b = _keys([99] + list(range(1, 12)))  # first block differs: every later key does too
    assert not set(a) & set(b)
    grown = extend_block_hashes(_keys(list(range(12)))[:1], list(range(12)), 4, 3)
    assert grown == a  # extending keeps what was there
    with pytest.raises(AssertionError):
        extend_block_hashes([], list(range(6)), 4, 2)  # only whole blocks get keys


def _cached_prefix(bm: BlockManager, tokens: list[int]) -> tuple[list[int], list[bytes]]:
    """Blocks that held ``tokens``, keyed and released: (their ids, their keys)."""
    keys = _keys(tokens)
    ids = bm.allocate(len(keys))
    for b, k in zip(ids, keys):
        bm.cache(b, k)
    bm.free(ids)
    return ids, keys


def test_released_keyed_blocks_are_cached_and_matched():
    bm = BlockManager(8, 4)
    ids, keys = _cached_prefix(bm, list(range(12)))
    assert bm.num_used == 0 and bm.num_free == 8 and bm.num_cached == 3
    assert bm.match(keys[:2] + [b"other"]) == ids[:2]  # the longest cached prefix
    assert bm.num_used == 2 and bm.num_cached == 1
    bm.share(ids[:1])
    assert bm.match(keys) == ids  # already referenced blocks are matched too
    bm.free(ids)
    bm.free(ids[:2])
    bm.free(ids[:1])
    assert bm.num_used == 0 and bm.num_cached == 3


def test_allocation_evicts_cached_blocks_tail_first_after_free_ones():
    bm = BlockManager(4, 4)
    ids, keys = _cached_prefix(bm, list(range(12)))
    (fresh,) = bm.allocate(1)
    assert fresh not in ids and bm.num_cached == 3  # a plain free block first
    (evicted,) = bm.allocate(1)
    assert evicted == ids[2] and bm.num_evicted == 1  # the prefix's tail goes first
    assert bm.match(keys) == ids[:2]  # the head is still there
    bm.free(ids[:2] + [fresh, evicted])
    assert bm.num_free == 4


def test_counting_a_cached_prefix_takes_nothing_and_a_matched_one_is_never_evicted():
    bm = BlockManager(4, 4)
    ids, keys = _cached_prefix(bm, list(range(12)))
    assert bm.count_cached(keys + [b"other"]) == 3 and bm.num_cached == 3  # only counted
    held = bm.match(keys[:2])  # a transfer's reservation: the rest of the prompt comes over
    fresh = bm.allocate(2)  # everything else, evicting the unheld tail
    assert set(fresh) & set(held) == set() and bm.count_cached(keys) == 2
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks with 0 free"):
        bm.allocate(1)
    bm.free(held + fresh)
    assert bm.num_free == 4 and bm.count_cached(keys) == 2
    assert BlockManager(4, 4, prefix_caching=False).count_cached(keys) == 0


def test_a_key_stays_with_the_first_block_that_holds_it():
    bm = BlockManager(4, 4)
    a, b = bm.allocate(2)
    (key,) = _keys([1, 2, 3, 4])
    bm.cache(a, key)
    bm.cache(b, key)  # the same content computed twice
    bm.free([a, b])
    assert bm.num_cached == 1 and bm.match([key]) == [a]


def test_without_prefix_caching_nothing_is_kept():
    bm = BlockManager(4, 4, prefix_caching=False)
    ids = bm.allocate(2)
    keys = _keys(list(range(8)))
    for b, k in zip(ids, keys):
        bm.cache(b, k)
    bm.free(ids)
    assert bm.num_cached == 0 and bm.match(keys) == [] and bm.num_free == 4


def test_double_free_and_keying_a_free_block_are_caught():
    bm = BlockManager(2, 4)
    (b,) = bm.allocate(1)
    bm.free([b])
    with pytest.raises(AssertionError, match="double free"):
        bm.free([b])
    with pytest.raises(AssertionError, match="cannot key free block"):
        bm.cache(b, b"k")


def test_blocks_freed_while_steps_run_wait_for_them_to_land():
    bm = BlockManager(6, 4)
    a = bm.allocate(2)
    b = bm.allocate(2)
    first = bm.launched()
    bm.free(a)  # step 1 may still touch them
    second = bm.launched()
    bm.free(b)  # steps 1 and 2 may
    assert bm.num_free == 2 and bm.num_parked == 4
    bm.landed(first)
    assert bm.num_free == 4 and bm.num_parked == 2
    bm.landed(second)
    assert bm.num_free == 6 and bm.num_parked == 0
    bm.free([])  # nothing in flight: freed at once
    c = bm.allocate(1)
    bm.free(c)
    assert bm.num_free == 6
