"""Where this decode replica sent recent prompts, by the content keys of their full KV blocks
(``cluster/block_hash.py``): the prefill replica that most likely still caches a prompt's
longest prefix. Bounded, least recently used keys forgotten first. Integers and bytes only."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

CAPACITY = 1 << 17  # keys: 128k blocks of prompts (8M tokens at 64 per block), about 10 MB


class PrefixRoutes:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()  # block key -> replica's serve id
        self._owned: Counter[str] = Counter()  # serve id -> keys it owns here

    def owned(self, serve_id: str) -> int:
        """Blocks of prompts last sent to ``serve_id``: what its cache likely holds of ours."""
        return self._owned[serve_id]

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

    def prefer(
        self,
        keys: Sequence[bytes],
        among: set[str],
        pick: str,
        load: Callable[[str], int],
        slack: int,
    ) -> tuple[str, bool]:
        """Where a prompt of ``keys`` goes: the replica in ``among`` that got its longest prefix,
        unless its ``load`` exceeds ``pick``'s by more than ``slack``, then ``pick``; recorded
        as the prefix's holder. Returns (serve id, whether the prefix decided)."""
        owner, _ = self.longest(keys, among)
        decided = owner is not None and load(owner) <= load(pick) + slack
        chosen = owner if decided else pick
        if keys:
            self.record(keys, chosen)
        return chosen, decided

    def record(self, keys: Sequence[bytes], serve_id: str) -> None:
        """``serve_id`` now holds the prefix ``keys`` name (it computed or reused them)."""
        for key in keys:
            before = self._owner.get(key)
            if before != serve_id:
                if before is not None:
                    self._owned[before] -= 1
                self._owned[serve_id] += 1
            self._owner[key] = serve_id
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            _, gone = self._owner.popitem(last=False)
            self._owned[gone] -= 1
