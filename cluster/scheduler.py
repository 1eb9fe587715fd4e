"""Continuous batching under a token budget: decodes first, then prefill chunks. Integers only.

Each step every running request that has sampled a token gets one decode slot; what is left of
the token budget goes to prompts, a chunk at a time (a long prompt spans several steps). Requests
join between steps and leave as soon as they finish. When a request needs a KV block and none is
free, the most recently admitted request is preempted: its blocks are freed and it is re-queued
at the front to recompute its prompt and the tokens it already produced.

Prefix cache and sliding layers' tables: ``block_tables``. A request admitted from the queue
starts computing after the longest cached prefix of its tokens.

Planning ahead: while a pure decode step runs on the device, ``schedule_ahead`` plans the next
one before its tokens are known. Each request of the step decodes the token the step is
sampling (the runner takes it from the step's sampled rows on the device, ``feed_rows``),
except a request that token ends by length; a request the token ends otherwise (an end of
sequence, a stop string) has its row computed and thrown away. Blocks let go meanwhile stay
held until the steps in flight land (``BlockManager.free``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.cluster.block_manager import BlockManager
from pdserve.cluster.block_tables import BlockTables
from pdserve.cluster.config import SchedulerConfig
from pdserve.cluster.kv_groups import KVGroups
from pdserve.cluster.request import FinishReason, Request, RequestStatus
from pdserve.cluster.sampling_params import SamplingParams

NO_GROUPS = KVGroups(slot_of=(), window=0)
FED = -1  # the token id of a chunk planned ahead: the step before it samples that token


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
    # planned ahead (``schedule_ahead``): chunk i < len(feed_rows) takes as its input token
    # row feed_rows[i] of the tokens the step before samples (its token_ids hold FED); later
    # chunks' token ids are known. None: a step planned after the tokens before it
    feed_rows: tuple[int, ...] | None = None

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
        self.tables = BlockTables(blocks, groups)
        self.null = self.tables.null  # the spare block sliding tables name before a window
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
            self.tables.key(req)
        else:
            self.waiting.remove(req)
        self.tables.release(req)
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
        assert self.blocks.num_landed == self.blocks.num_launched, "a launched step is in flight"
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        for req in self.running:
            self.tables.key(req)
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
            self.tables.match_prefix(req)
            n = self._chunk_len(req, budget)
            grow = self.blocks.blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
            if grow * (1 + self.tables.windowed) > self.blocks.num_free - (
                self.watermark if self.running else 0
            ):
                self.tables.release(req)  # back to the cache; matched again next time
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            req.num_keyed_blocks = len(req.block_ids)
            self.tables.grow(req, grow)
            req.num_cached_tokens = req.num_written_tokens = req.num_computed_tokens
            self.num_prefix_query_tokens += req.num_tokens
            self.num_prefix_hit_tokens += req.num_computed_tokens
            chunks.append(self._take(req, n))
            budget -= n
        chunks.sort(key=lambda c: len(c.token_ids) != 1)  # stable: decodes first
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def schedule_ahead(self, prev: SchedulerOutput, most: int) -> SchedulerOutput | None:
        """The pure decode step after ``prev``, a pure decode step launched but not collected,
        planned before its tokens are known; at most ``most`` rows. Requests of ``prev`` come
        first, in its order, each decoding the token ``prev`` samples for it (``feed_rows``);
        then running requests that ``prev`` did not hold and whose next token is known (one
        a prefill replica handed over). None wherever that need not be the step ``schedule``
        would plan once the tokens are in: a request waits or is mid-prompt, a request of
        ``prev`` is not decoding its last token, the step exceeds ``most`` or the token
        budget, or the blocks it needs are not free (``schedule`` would preempt)."""
        if self.waiting or not prev.chunks:
            return None
        if any(len(c.token_ids) != 1 or not c.sample for c in prev.chunks):
            return None
        fed: list[tuple[int, ScheduledChunk, Request]] = []
        held: set[str] = set()
        for row, c in enumerate(prev.chunks):
            req = self.requests.get(c.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # finished since prev was planned: its row is thrown away
            held.add(req.request_id)
            if not req.num_computed_tokens == c.end == req.num_tokens:
                return None  # the step before prev is not collected, or prev is stale
            if not self._ends_by_length(req, c.num_output_tokens + 1, c.end + 1):
                fed.append((row, c, req))
        joined = [r for r in self.running if r.request_id not in held]
        if any(r.num_uncomputed_tokens != 1 for r in joined):
            return None
        reqs = [req for _, _, req in fed] + joined
        if not reqs or len(reqs) > min(most, self.config.max_num_batched_tokens):
            return None
        grow = [self.blocks.blocks_for(r.num_computed_tokens + 1) - len(r.block_ids) for r in reqs]
        if sum(grow) * (1 + self.tables.windowed) > self.blocks.num_free:
            return None
        for req, n in zip(reqs, grow):
            self.tables.key(req)
            self.tables.slide(req)
            self.tables.grow(req, n)
        chunks = []
        for _, c, req in fed:  # its token is not in yet: the chunk samples the one after it
            start = req.num_computed_tokens
            req.num_computed_tokens += 1
            chunks.append(
                ScheduledChunk(
                    request_id=req.request_id,
                    token_ids=(FED,),
                    start=start,
                    block_ids=tuple(req.block_ids),
                    sample=True,
                    sampling=req.sampling,
                    num_output_tokens=c.num_output_tokens + 1,
                    first_sent_block=req.first_sent_block,
                    window_block_ids=tuple(req.window_block_ids),
                )
            )
        chunks += [self._take(req, 1) for req in joined]
        return SchedulerOutput(tuple(chunks), feed_rows=tuple(row for row, _, _ in fed))

    def _ends_by_length(self, req: Request, num_outputs: int, num_tokens: int) -> bool:
        """Whether a request with these counts is over (``LLMEngine``'s length check)."""
        return num_outputs >= req.sampling.max_tokens or num_tokens >= self.max_model_len

    def _chunk_len(self, req: Request, budget: int) -> int:
        n = min(req.num_uncomputed_tokens, budget)
        cap = self.config.long_prefill_token_threshold
        return min(n, cap) if cap > 0 else n

    def _reserve(
        self, req: Request, num_tokens: int, scheduled: set[str], preempted: list[str]
    ) -> bool:
        """Grow req's block table to hold num_tokens, preempting the newest requests not yet
        scheduled in this step (req itself last) if blocks run short."""
        self.tables.slide(req)
        grow = self.blocks.blocks_for(num_tokens) - len(req.block_ids)
        while grow * (1 + self.tables.windowed) > self.blocks.num_free:
            victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        self.tables.grow(req, grow)
        return True

    def written(self, sched: SchedulerOutput, requests: Sequence[Request]) -> None:
        """``sched`` ran to the end: its chunks' KV is in their blocks. ``requests``: each
        chunk's request as launched."""
        for c, req in zip(sched.chunks, requests):
            if req.status == RequestStatus.RUNNING:
                req.num_written_tokens = max(req.num_written_tokens, c.end)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.tables.key(req)
        self.tables.release(req)
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
