"""The decode role's handoff on integers and a tiny model: reserving blocks for a prompt that
a prefill replica runs (a cached prefix taken, not sent), and giving them back whole."""

from __future__ import annotations

import pytest

from pdserve.cluster import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from pdserve.cluster.block_hash import extend_block_hashes
from pdserve.cluster.errors import OverloadedError, PrefixEvicted
from pdserve.decode_worker.decode_engine import DecodeEngine


def _engine(path: str, num_blocks: int) -> DecodeEngine:
    return DecodeEngine(
        EngineConfig(
            model=path,
            dtype="float32",
            cache=CacheConfig(block_size=16, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=48),
        )
    )


def test_reserving_with_a_cached_prefix_takes_it_and_gives_it_back_whole(tiny_model):
    """Decode side of a handoff: the prefix blocks are matched, the rest allocated; an evicted
    prefix block or a full cache leave no reference behind."""
    eng = _engine(tiny_model, num_blocks=8)
    prompt = list(range(4, 52))  # 48 tokens: 3 blocks
    eng.generate([prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    keys = extend_block_hashes([], prompt, 16, 3)
    assert eng.blocks.num_cached == 3
    got = eng.reserve(80, keys[:2])  # 5 blocks: the 2 cached, 3 fresh
    assert got[:2] == eng.blocks.match(keys[:2]) and eng.blocks.num_used == 5
    eng.blocks.free(got[:2])
    eng.release(got)
    assert eng.blocks.num_used == 0 and eng._reserved == 0 and eng.blocks.num_cached == 3
    with pytest.raises(OverloadedError, match="full"):
        eng.reserve(16 * 9, keys[:1])  # 8 more blocks; 7 free (8 less the one matched)
    with pytest.raises(PrefixEvicted, match="1 of the prompt's 3"):
        eng.reserve(64, keys[:2] + [b"gone"])
    assert eng.blocks.num_used == 0 and eng._reserved == 0 and eng.blocks.num_cached == 3
