"""Paged KV block bookkeeping over integer block ids: a free list, reference counts, and the
prefix cache's index of full blocks by content key.

A block is in use (referenced), cached (unreferenced, its content kept under its key until the
space is needed), or free. Cached blocks count as free: ``allocate`` takes plain free blocks
first, then evicts cached ones, least recently released first. ``match`` hands out the cached
blocks of a prefix to another request.

Steps run on the device after the host planned them, and a step is planned while the one before
it still runs (``Scheduler.schedule_ahead``): a block let go while a launched step is not yet
collected may still be read or written by it. ``free`` parks such blocks until every step
launched before the free has landed (``landed``); only then are they cached or free.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, keyed; LRU first
        self._key_of: dict[int, bytes] = {}  # block -> content key
        self._block_of: dict[bytes, int] = {}  # content key -> block
        self.num_evicted = 0  # cached blocks reused for other content, since start
        self.num_launched = 0  # steps launched since start (``launched``)
        self.num_landed = 0  # of which collected: the device is done with them
        self._parked: deque[tuple[int, list[int]]] = deque()  # (launched count, freed ids)

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out: free ones and cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks that keep their content for a later prefix hit."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.num_free} free")
        ids = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently released cached block
                b, _ = self._cached.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
                self.num_evicted += 1
            assert self._ref[b] == 0, f"block {b} on the free list is still referenced"
            self._ref[b] = 1
            ids.append(b)
        return ids

    def share(self, ids: list[int]) -> None:
        for b in ids:
            assert self._ref[b] > 0, f"cannot share free block {b}"
            self._ref[b] += 1

    def free(self, ids: list[int]) -> None:
        """Drop one reference to each block. A block nobody references is cached if it holds a
        keyed prefix, else free. ``ids`` in table order are released last to first, so that a
        prefix's tail is evicted before its head. While launched steps are not collected the
        blocks stay held until they are (``landed``)."""
        if self.num_landed < self.num_launched:
            if ids:
                self._parked.append((self.num_launched, list(ids)))
            return
        self._release(ids)

    def _release(self, ids: list[int]) -> None:
        for b in reversed(ids):
            assert self._ref[b] > 0, f"double free of block {b}"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._key_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    # ---- steps in flight ----

    def launched(self) -> int:
        """A step that reads and writes blocks was queued on the device; its number."""
        self.num_launched += 1
        return self.num_launched

    def landed(self, step: int) -> None:
        """Step ``step`` (and every step before it) is done on the device: blocks freed while
        it was in flight are released now."""
        assert step <= self.num_launched, (step, self.num_launched)
        self.num_landed = max(self.num_landed, step)
        while self._parked and self._parked[0][0] <= self.num_landed:
            self._release(self._parked.popleft()[1])

    @property
    def num_parked(self) -> int:
        """Blocks let go that a step in flight may still touch."""
        return sum(len(ids) for _, ids in self._parked)

    # ---- prefix cache ----

    def cache(self, block: int, key: bytes) -> None:
        """Record that referenced ``block`` holds the full block of content ``key``. A key
        already held by another block keeps that one (this block stays unkeyed)."""
        assert self._ref[block] > 0, f"cannot key free block {block}"
        if not self.prefix_caching or key in self._block_of or block in self._key_of:
            return
        self._key_of[block] = key
        self._block_of[key] = block

    def count_cached(self, keys: list[bytes]) -> int:
        """How many of ``keys``, from the first, have a block now (referenced or cached). It
        only reads, so another thread may ask for a hint: the answer may be stale by the time
        it acts on it (``match`` then finds fewer)."""
        if not self.prefix_caching:
            return 0
        n = 0
        for key in keys:
            if key not in self._block_of:
                break
            n += 1
        return n

    def match(self, keys: list[bytes]) -> list[int]:
        """The blocks holding the longest prefix of ``keys``, each now referenced once more."""
        if not self.prefix_caching:
            return []
        ids = []
        for key in keys:
            b = self._block_of.get(key)
            if b is None:
                break
            ids.append(b)
        for b in ids:
            if self._ref[b] == 0:
                del self._cached[b]
            self._ref[b] += 1
        return ids
