"""Continuous batching under a token budget: decodes first, then prefill chunks. Integers only.

Each step every running request that has sampled a token gets one decode slot; what is left of
the token budget goes to prompts, a chunk at a time (a long prompt spans several steps). Requests
join between steps and leave as soon as they finish. When a request needs a KV block and none is
free, the most recently admitted request is preempted: its blocks are freed and it is re-queued
at the front to recompute its prompt and the tokens it already produced.

Prefix cache: a request admitted from the queue takes the cached blocks of the longest prefix
of its tokens (whole blocks, leaving at least one token to run) and starts computing after it.
A request's full blocks are keyed once a step that wrote their KV has been collected
(``written``): at the next plan, and when it leaves. A step that failed writes nothing: its
tokens' blocks are never keyed.

Sliding layers (``kv_groups``): every request also holds a table for them, grown with its full
table; before each chunk the blocks before the chunk's window go back to the pool (keyed ones to
the prefix cache, under a key of their own), and a prefix hit needs the sliding blocks of the
window before it too.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from pdserve.cluster.block_hash import extend_block_hashes
from pdserve.cluster.block_manager import BlockManager
from pdserve.cluster.config import SchedulerConfig
from pdserve.cluster.kv_groups import KVGroups
from pdserve.cluster.request import FinishReason, Request, RequestStatus
from pdserve.cluster.sampling_params import SamplingParams

WINDOW_KEY = b"w"  # appended to a block's content key for its sliding layers' block
NO_GROUPS = KVGroups(slot_of=(), window=0)


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one request to run in this step."""

    request_id: str
    token_ids: tuple[int, ...]  # the tokens to run now
    start: int  # position of token_ids[0]; positions before it already have KV
    block_ids: tuple[int, ...]  # the request's block table, covering start + len(token_ids)
    sample: bool  # the chunk reaches the last known token: sample the next one
    sampling: SamplingParams
    num_output_tokens: int  # tokens produced so far (keys per-token seeded sampling)
    first_sent_block: int = 0  # prefill role: the first block of the prompt's KV transfer
    window_block_ids: tuple[int, ...] = ()  # sliding layers' table (same length), or empty

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's work. Single-token chunks (decodes) come first."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def num_decode_chunks(self) -> int:
        return sum(1 for c in self.chunks if len(c.token_ids) == 1)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        max_model_len: int,
        groups: KVGroups = NO_GROUPS,
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.groups = groups
        self.windowed = groups.windowed
        self.null = blocks.num_blocks  # the cache's spare block: sliding entries before a window
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        # admission leaves this many blocks free so running requests can keep decoding
        self.watermark = blocks.num_blocks // 100
        self.num_preemptions = 0  # since start, for metrics
        self.num_prefix_query_tokens = 0  # prompt tokens admitted, since start
        self.num_prefix_hit_tokens = 0  # of which the prefix cache held the KV

    # ---- queue ----

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """A request whose prompt KV is already in its blocks (computed by a prefill replica)."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        assert req.status == RequestStatus.RUNNING and req.block_ids
        self.requests[req.request_id] = req
        self.running.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a request: free its blocks and forget it. Safe to call twice."""
        if req.status == RequestStatus.FINISHED:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            self._key_blocks(req)
        else:
            self.waiting.remove(req)
        self._release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, FinishReason.ABORT)
        return req

    # ---- one step ----

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        for req in self.running:
            self._key_blocks(req)
        # decodes first, then prompts already being prefilled, each in admission order
        order = [r for r in self.running if r.num_uncomputed_tokens == 1]
        order += [r for r in self.running if r.num_uncomputed_tokens > 1]
        scheduled: set[str] = set()
        for req in order:
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = self._chunk_len(req, budget)
            if not self._reserve(req, req.num_computed_tokens + n, scheduled, preempted):
                continue  # req itself was preempted
            chunks.append(self._take(req, n))
            scheduled.add(req.request_id)
            budget -= n
        # no admission in a step that preempted: blocks are short, and a request preempted
        # now would come straight back and take the blocks its preemption freed
        while (
            self.waiting
            and not preempted
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            self._match_prefix(req)
            n = self._chunk_len(req, budget)
            grow = self.blocks.blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
            if grow * (1 + self.windowed) > self.blocks.num_free - (
                self.watermark if self.running else 0
            ):
                self._release(req)  # back to the cache; matched again next time
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            req.num_keyed_blocks = len(req.block_ids)
            self._grow(req, grow)
            req.num_cached_tokens = req.num_written_tokens = req.num_computed_tokens
            self.num_prefix_query_tokens += req.num_tokens
            self.num_prefix_hit_tokens += req.num_computed_tokens
            chunks.append(self._take(req, n))
            budget -= n
        chunks.sort(key=lambda c: len(c.token_ids) != 1)  # stable: decodes first
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def _chunk_len(self, req: Request, budget: int) -> int:
        n = min(req.num_uncomputed_tokens, budget)
        cap = self.config.long_prefill_token_threshold
        return min(n, cap) if cap > 0 else n

    def _reserve(
        self, req: Request, num_tokens: int, scheduled: set[str], preempted: list[str]
    ) -> bool:
        """Grow req's block table to hold num_tokens, preempting the newest requests not yet
        scheduled in this step (req itself last) if blocks run short."""
        self._slide(req)
        grow = self.blocks.blocks_for(num_tokens) - len(req.block_ids)
        while grow * (1 + self.windowed) > self.blocks.num_free:
            victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        self._grow(req, grow)
        return True

    def _grow(self, req: Request, n: int) -> None:
        """Add ``n`` blocks to ``req``'s table (and as many to its sliding table)."""
        if n > 0:
            req.block_ids.extend(self.blocks.allocate(n))
            if self.windowed:
                req.window_block_ids.extend(self.blocks.allocate(n))

    def _slide(self, req: Request) -> None:
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

    def _release(self, req: Request) -> None:
        """Free every block ``req`` holds, its sliding ones first (evicted before its full
        ones, a prefix's tail before its head)."""
        self.blocks.free(
            [b for b in req.window_block_ids[req.window_start_block :] if b != self.null]
        )
        self.blocks.free(req.block_ids)
        req.block_ids, req.window_block_ids, req.window_start_block = [], [], 0

    def _match_prefix(self, req: Request) -> None:
        """Reference the cached blocks of ``req``'s longest cached prefix (whole blocks, at
        least one token left to run; with sliding layers, their blocks of the window before
        it cached too) and count them as computed."""
        if not self.blocks.prefix_caching:
            return
        bs = self.blocks.block_size
        full = (req.num_tokens - 1) // bs
        keys = self._block_keys(req, full)[:full]
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

    def written(self, sched: SchedulerOutput) -> None:
        """``sched`` ran to the end: its chunks' KV is in their blocks."""
        for c in sched.chunks:
            req = self.requests.get(c.request_id)
            if req is not None and req.status == RequestStatus.RUNNING:
                req.num_written_tokens = max(req.num_written_tokens, c.end)

    def _key_blocks(self, req: Request) -> None:
        """Key ``req``'s full blocks whose KV a collected step wrote (cached once it lets go)."""
        full = req.num_written_tokens // self.blocks.block_size
        if not self.blocks.prefix_caching or full <= req.num_keyed_blocks:
            return
        keys = self._block_keys(req, full)
        for i in range(req.num_keyed_blocks, full):
            self.blocks.cache(req.block_ids[i], keys[i])
            if self.windowed and i >= req.window_start_block:
                self.blocks.cache(req.window_block_ids[i], keys[i] + WINDOW_KEY)
        req.num_keyed_blocks = full

    def _block_keys(self, req: Request, n: int) -> list[bytes]:
        """``req``'s first ``n`` block keys, hashing (and copying) only the tokens of blocks
        without a key yet: this runs in every plan, for requests decoding into new blocks."""
        bs = self.blocks.block_size
        first = len(req.block_hashes) * bs
        tokens = req.token_slice(first, max(first, n * bs))
        return extend_block_hashes(req.block_hashes, tokens, bs, n, first)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._key_blocks(req)
        self._release(req)
        req.num_keyed_blocks = req.num_written_tokens = 0
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _take(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
        tokens = req.token_slice(start, start + n)
        req.num_computed_tokens += n
        return ScheduledChunk(
            request_id=req.request_id,
            token_ids=tuple(tokens),
            start=start,
            block_ids=tuple(req.block_ids),
            sample=start + n == req.num_tokens,
            sampling=req.sampling,
            num_output_tokens=len(req.output_token_ids),
            first_sent_block=req.first_sent_block,
            window_block_ids=tuple(req.window_block_ids),
        )
