"""How many KV blocks a worker allocates: the configured count, or what its memory holds.

Integers only: the runner allocates the tensor.
"""

from __future__ import annotations

import torch

from pdserve.cluster.config import EngineConfig
from pdserve.cluster.kv_groups import KVGroups


def propose_num_blocks(
    config: EngineConfig,
    groups: KVGroups,
    kv_cache_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
) -> int:
    """``cache.num_blocks`` when set; else the blocks that fit in ``gpu_memory_fraction`` of
    the GPU's free memory (``cpu_kv_bytes`` on CPU), but no more than every running sequence
    at full length could use. ValueError when not one block fits."""
    cache, sched = config.cache, config.scheduler
    if cache.num_blocks is not None:
        return cache.num_blocks
    row = kv_cache_dim * torch.finfo(dtype).bits // 8
    block_bytes = groups.num_slots * row * cache.block_size
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * cache.gpu_memory_fraction)
    else:
        budget = cache.cpu_kv_bytes
    per_seq = groups.most_blocks(max_model_len, sched.max_num_batched_tokens, cache.block_size)
    num = min(budget // block_bytes, sched.max_num_seqs * per_seq)
    if num < 1:
        raise ValueError(f"no room for a single KV block ({block_bytes} bytes) on {device}")
    return num
