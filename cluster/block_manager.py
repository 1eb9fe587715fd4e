"""Paged KV block bookkeeping over integer block ids: a free list and reference counts."""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Hands out KV cache blocks. Ref counts let a block be shared (prefix sharing comes later)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for b in ids:
            assert self._ref[b] == 0, f"block {b} on the free list is still referenced"
            self._ref[b] = 1
        return ids

    def share(self, ids: list[int]) -> None:
        for b in ids:
            assert self._ref[b] > 0, f"cannot share free block {b}"
            self._ref[b] += 1

    def free(self, ids: list[int]) -> None:
        for b in ids:
            assert self._ref[b] > 0, f"double free of block {b}"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
