"""A request's block tables against the block manager: grown as it runs, slid past its window
on sliding layers, released, matched against the prefix cache and keyed for it. Integers only.

Prefix cache: a request admitted from the queue takes the cached blocks of the longest prefix
of its tokens (whole blocks, leaving at least one token to run) and starts computing after it.
A request's full blocks are keyed once a step that wrote their KV has been collected (its
``num_written_tokens``): at the next plan, and when it leaves. A step that failed writes
nothing: its tokens' blocks are never keyed.

Sliding layers (``kv_groups``): every request also holds a table for them, grown with its full
table; before each chunk the blocks before the chunk's window go back to the pool (keyed ones to
the prefix cache, under a key of their own), and a prefix hit needs the sliding blocks of the
window before it too.
"""

from __future__ import annotations

from pdserve.cluster.block_hash import extend_block_hashes
from pdserve.cluster.block_manager import BlockManager
from pdserve.cluster.kv_groups import KVGroups
from pdserve.cluster.request import Request

WINDOW_KEY = b"w"  # appended to a block's content key for its sliding layers' block


class BlockTables:
    def __init__(self, blocks: BlockManager, groups: KVGroups) -> None:
        self.blocks = blocks
        self.groups = groups
        self.windowed = groups.windowed
        self.null = blocks.num_blocks  # the cache's spare block: sliding entries before a window

    def grow(self, req: Request, n: int) -> None:
        """Add ``n`` blocks to ``req``'s table (and as many to its sliding table)."""
        if n > 0:
            req.block_ids.extend(self.blocks.allocate(n))
            if self.windowed:
                req.window_block_ids.extend(self.blocks.allocate(n))

    def slide(self, req: Request) -> None:
        """Give back ``req``'s sliding blocks before its next chunk's window (keyed ones stay
        in the prefix cache until their space is needed)."""
        if not self.windowed:
            return
        start = self.groups.window_start_block(req.num_computed_tokens, self.blocks.block_size)
        if start <= req.window_start_block:
            return
        table = req.window_block_ids
        gone = [b for b in table[req.window_start_block : start] if b != self.null]
        table[req.window_start_block : start] = [self.null] * (start - req.window_start_block)
        req.window_start_block = start
        self.blocks.free(gone)

    def release(self, req: Request) -> None:
        """Free every block ``req`` holds, its sliding ones first (evicted before its full
        ones, a prefix's tail before its head)."""
        self.blocks.free(
            [b for b in req.window_block_ids[req.window_start_block :] if b != self.null]
        )
        self.blocks.free(req.block_ids)
        req.block_ids, req.window_block_ids, req.window_start_block = [], [], 0

    def match_prefix(self, req: Request) -> None:
        """Reference the cached blocks of ``req``'s longest cached prefix (whole blocks, at
        least one token left to run; with sliding layers, their blocks of the window before
        it cached too) and count them as computed."""
        if not self.blocks.prefix_caching:
            return
        bs = self.blocks.block_size
        full = (req.num_tokens - 1) // bs
        keys = self.block_keys(req, full)[:full]
        n = self.blocks.count_cached(keys)
        if self.windowed:
            wkeys = [k + WINDOW_KEY for k in keys]

            def window_start(n: int) -> int:
                return self.groups.window_start_block(n * bs, bs)

            while n and self.blocks.count_cached(wkeys[window_start(n) : n]) < n - window_start(n):
                n -= 1  # the window before block n lost a block: a shorter prefix
            first = window_start(n)
            req.window_block_ids = [self.null] * first + self.blocks.match(wkeys[first:n])
            req.window_start_block = first
        req.block_ids = self.blocks.match(keys[:n])
        assert len(req.block_ids) == n and len(req.window_block_ids) in (0, n), "stale count"
        req.num_computed_tokens = n * bs

    def key(self, req: Request) -> None:
        """Key ``req``'s full blocks whose KV a collected step wrote (cached once it lets go)."""
        full = req.num_written_tokens // self.blocks.block_size
        if not self.blocks.prefix_caching or full <= req.num_keyed_blocks:
            return
        keys = self.block_keys(req, full)
        for i in range(req.num_keyed_blocks, full):
            self.blocks.cache(req.block_ids[i], keys[i])
            if self.windowed and i >= req.window_start_block:
                self.blocks.cache(req.window_block_ids[i], keys[i] + WINDOW_KEY)
        req.num_keyed_blocks = full

    def block_keys(self, req: Request, n: int) -> list[bytes]:
        """``req``'s first ``n`` block keys, hashing (and copying) only the tokens of blocks
        without a key yet: this runs in every plan, for requests decoding into new blocks."""
        bs = self.blocks.block_size
        first = len(req.block_hashes) * bs
        tokens = req.token_slice(first, max(first, n * bs))
        return extend_block_hashes(req.block_hashes, tokens, bs, n, first)
