"""Block copies in and out of a paged cache: the row-view gather/scatter against the plain
block-dimension index ops, for whole caches and for layer ranges."""

from __future__ import annotations

import pytest
import torch

from pdserve.cluster.kv_layout import (
    block_rows,
    device_index,
    gather_blocks,
    host_rows,
    scatter_blocks,
    warm_up,
)


def _cache(layers=3, blocks=7, bs=4, width=5) -> torch.Tensor:
    return torch.randn(layers, blocks, bs, width, generator=torch.Generator().manual_seed(0))


def test_block_rows_number_layer_l_block_b_as_l_times_blocks_plus_b():
    rows = block_rows(_cache(layers=3, blocks=7), torch.tensor([5, 2]))
    assert rows.tolist() == [[5, 2], [7 + 5, 7 + 2], [14 + 5, 14 + 2]]


def test_gather_matches_index_select_on_the_block_dimension():
    cache = _cache()
    ids = device_index([6, 0, 3], cache.device)
    rows = block_rows(cache, [6, 0, 3])
    assert torch.equal(gather_blocks(cache, rows, slice(None)), cache.index_select(1, ids))
    part = gather_blocks(cache, rows, slice(1, 3))
    assert torch.equal(part, cache[1:3].index_select(1, ids))
    out = torch.empty(3, 3, 4, 5)
    gather_blocks(cache, rows, slice(0, 1), out=out[0:1])
    gather_blocks(cache, rows, slice(1, 3), out=out[1:3])
    assert torch.equal(out, cache.index_select(1, ids))


def test_scatter_writes_only_the_given_blocks_and_layers():
    cache = _cache()
    want = cache.clone()
    ids = torch.tensor([4, 1])
    rows = block_rows(cache, ids)
    kv = torch.randn(2, 2, 4, 5)
    scatter_blocks(cache, rows, kv, slice(1, 3))
    want[1:3].index_copy_(1, ids, kv)
    assert torch.equal(cache, want)
    # whole-cache write, then read back in the same order
    kv = torch.randn(3, 2, 4, 5)
    scatter_blocks(cache, rows, kv, slice(None))
    assert torch.equal(gather_blocks(cache, rows, slice(None)), kv)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_host_rows_are_the_block_rows_and_scatter_from_the_host(device):
    """Rows made on the host (pinned for a GPU cache) number the blocks as ``block_rows`` does,
    and a scatter given them writes what it writes with the device's own."""
    device = torch.device(device)
    cache = _cache(layers=4, blocks=9).to(device)
    ids = [8, 0, 5]
    rows = host_rows(cache, ids)
    assert rows.device.type == "cpu" and rows.is_pinned() == (device.type == "cuda")
    assert torch.equal(rows, block_rows(cache, ids).cpu())
    kv = torch.randn(4, 3, 4, 5, device=device)
    by_host, by_device = cache.clone(), cache.clone()
    scatter_blocks(by_host, rows, kv, slice(None))
    scatter_blocks(by_device, block_rows(cache, ids), kv, slice(None))
    assert torch.equal(by_host, by_device)
    assert torch.equal(gather_blocks(by_host, block_rows(cache, ids), slice(None)), kv)
    others = device_index([1, 2, 3, 4, 6, 7], device)
    assert torch.equal(by_host.index_select(1, others), cache.index_select(1, others))


@pytest.mark.parametrize("layers", [1, 3])
def test_warm_up_leaves_the_cache_as_it_was(layers):
    cache = torch.randn(layers, 4, 2, 5)
    before = cache.clone()
    warm_up(cache)
    assert torch.equal(cache, before)
