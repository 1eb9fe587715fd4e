"""Where this decode replica sent recent prompts, by the content keys of their full KV blocks
(``cluster/block_hash.py``): the prefill replica that most likely still caches a prompt's
longest prefix. Bounded, least recently used keys forgotten first. Integers and bytes only."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

CAPACITY = 1 << 17  # keys: 128k blocks of prompts (8M tokens at 64 per block), about 10 MB


class PrefixRoutes:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()  # block key -> prefill serve id

    def __len__(self) -> int:
        return len(self._owner)

    def longest(self, keys: Sequence[bytes], among: set[str]) -> tuple[str | None, int]:
        """(serve id, blocks) of the replica in ``among`` that got the longest prefix of
        ``keys``; (None, 0) if none did."""
        for n in range(len(keys), 0, -1):
            owner = self._owner.get(keys[n - 1])
            if owner in among:
                return owner, n
        return None, 0

    def record(self, keys: Sequence[bytes], serve_id: str) -> None:
        """``serve_id`` now holds the prefix ``keys`` name (it computed or reused them)."""
        for key in keys:
            self._owner[key] = serve_id
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)
