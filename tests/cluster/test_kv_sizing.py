"""KV blocks a worker allocates: the configured count, or what its memory budget holds, capped
by what the running sequences could ever use."""

from __future__ import annotations

import pytest
import torch

from pdserve.cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.cluster.kv_groups import KVGroups
from pdserve.cluster.kv_sizing import propose_num_blocks

CPU = torch.device("cpu")
FULL = KVGroups.from_windows([0, 0])  # two layers, no sliding ones: two slots


def _config(seqs: int = 256, **cache) -> EngineConfig:
    return EngineConfig(
        model="unused",
        cache=CacheConfig(block_size=16, **cache),
        scheduler=SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=64),
    )


def test_a_configured_count_is_taken_as_it_is():
    assert propose_num_blocks(_config(num_blocks=7), FULL, 576, torch.bfloat16, CPU, 4096) == 7


def test_the_memory_budget_over_the_bytes_of_a_block():
    # a block: 2 slots x 16 tokens x 576 wide x 2 bytes = 36,864 bytes
    cfg = _config(cpu_kv_bytes=36_864 * 10 + 100)
    assert propose_num_blocks(cfg, FULL, 576, torch.bfloat16, CPU, 4096) == 10
    assert propose_num_blocks(cfg, FULL, 576, torch.float32, CPU, 4096) == 5


def test_no_more_than_the_running_sequences_could_use():
    # 2 sequences of at most 100 tokens: 7 blocks each
    cfg = _config(seqs=2, cpu_kv_bytes=1 << 30)
    assert propose_num_blocks(cfg, FULL, 576, torch.bfloat16, CPU, 100) == 14
    sliding = KVGroups.from_windows([0, 32])  # plus the sliding table's peak
    extra = sliding.peak_window_blocks(64, 16)
    assert propose_num_blocks(cfg, sliding, 576, torch.bfloat16, CPU, 100) == 2 * (7 + extra)


def test_not_one_block_is_an_error_naming_its_size():
    with pytest.raises(ValueError, match=r"single KV block \(36864 bytes\) on cpu"):
        propose_num_blocks(_config(cpu_kv_bytes=1000), FULL, 576, torch.bfloat16, CPU, 4096)
