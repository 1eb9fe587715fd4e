"""One attempt of a decode replica to have a prompt prefilled by the prefill pool.

The prefill call goes out at once; the KV blocks it will fill are reserved meanwhile on the
engine thread (the call needs only their count), so the round trip through the engine loop,
which waits for the running step, is not on the way to the first token. The KV receive is
posted as soon as the prefill replica announces the transfer (point to point) or with its reply
(object store), and waits for the reservation. A reservation the replica has no room for ends
the attempt with ``OverloadedError`` (``full``), and the prefill call is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING

import msgspec

from pdserve.cluster import trace_file
from pdserve.cluster.block_hash import prompt_block_keys
from pdserve.cluster.errors import OverloadedError
from pdserve.cluster.messages import (
    FirstToken,
    GenerateRequest,
    KVDestination,
    KVHandle,
    PrefillAccepted,
    PrefillRequest,
    PrefillResult,
)

if TYPE_CHECKING:
    from pdserve.decode_worker.server import DecodeServer

log = logging.getLogger(__name__)


class PrefillAttempt:
    def __init__(
        self,
        server: DecodeServer,
        req: GenerateRequest,
        number: int,
        tried: list[str],
        use_cached: bool = True,
    ) -> None:
        """Starts reserving blocks for ``req``'s prompt now. ``tried``: the prefill replicas
        earlier attempts went to (a retry avoids them); this attempt's joins them.
        ``use_cached``: count the prompt's prefix this replica caches (False after one was
        evicted under an attempt: the prompt's KV then comes whole)."""
        self.server, self.req, self.tried = server, req, tried
        self.transfer_id = f"{req.request_id}/{number}-{uuid.uuid4().hex[:8]}"
        self.handed = False  # set on the engine thread once a request owns the blocks
        self.receiving: asyncio.Future | None = None  # the KV receive, once posted
        self.called_at = 0.0  # time.perf_counter() when the prefill call went out
        self.answered_at = 0.0  # time.perf_counter() when the reply came
        self.landed_at = 0.0  # time.perf_counter() when the KV receive ended
        ids, blocks = req.prompt_token_ids, server.engine.blocks
        # the prompt's full-block keys, for this replica's cache and for the choice of a line
        wanted = blocks.prefix_caching or server.lines is not None
        self.keys = prompt_block_keys(ids, blocks.block_size) if wanted else []
        # blocks this replica's prefix cache holds (the conversation's earlier turns ran here):
        # prefill sends only those after them. Counted here, so the call need not wait for the
        # engine thread; should one be evicted meanwhile the reservation fails and a retry
        # counts again
        self.held = blocks.count_cached(self.keys) if use_cached else 0
        held_keys = self.keys[: self.held]
        self._reserving = asyncio.ensure_future(
            server.aengine.run_owned(
                lambda e: e.reserve(len(ids), held_keys), lambda e, got: e.release(got)
            )
        )

    @property
    def blocks(self) -> list[int]:
        """The reserved blocks (once ``first_token`` returned): the ``held`` cached ones, then
        those the transfer fills."""
        return self._reserving.result()

    @property
    def full(self) -> bool:
        """The replica had no room for the prompt: no retry on another prefill replica helps."""
        r = self._reserving
        return r.done() and not r.cancelled() and isinstance(r.exception(), OverloadedError)

    async def first_token(self) -> FirstToken:
        """Call a prefill replica other than those tried, with the blocks reserved meanwhile;
        post the KV receive when the transfer is announced. Returns the token it sampled."""
        s, req = self.server, self.req
        dest = KVDestination(
            transfer_id=self.transfer_id,
            decode_replica=s.replica_id,
            num_blocks=s.engine.blocks.blocks_for(len(req.prompt_token_ids)),
            first_block=self.held,
            num_window_blocks=s.engine.groups.window_blocks(
                len(req.prompt_token_ids), s.engine.blocks.block_size
            ),
            fingerprint=s.fingerprint,
            endpoint=s.transport.endpoint(),
        )
        call = PrefillRequest(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling=req.sampling,
            kv=dest,
            avoid=tuple(self.tried),
        )
        self.called_at, called_at = time.perf_counter(), time.time()
        target, stream = s.prefill_stream(call, self.keys)
        if target is not None:  # a line: should it fail before accepting, a retry avoids it
            self.tried.append(target)
        result: list[PrefillResult] = []

        async def collect() -> None:
            async for item in stream:
                if isinstance(item, PrefillAccepted):
                    if item.replica not in self.tried:
                        self.tried.append(item.replica)
                    if item.kv is not None:
                        self._post(item.kv, dest)
                else:
                    result.append(item)

        collecting = asyncio.ensure_future(asyncio.wait_for(collect(), s.spec.prefill_timeout_s))
        try:
            await asyncio.wait([self._reserving, collecting], return_when=asyncio.FIRST_EXCEPTION)
            if self._reserving.done():
                self._reserving.result()  # the replica is full: raise it now
            await collecting
            await self._reserving  # a reply faster than the engine thread: rare
        finally:
            if not collecting.done():
                collecting.cancel()
                await asyncio.gather(collecting, return_exceptions=True)
            if not result:  # the prefill replica stops (and drops the prompt's KV)
                if target is None:
                    stream.cancel()
                else:  # a line's stream told it when ``collect`` was cancelled
                    await stream.aclose()
        if not result:
            raise RuntimeError("the prefill replica's reply ended without a result")
        self.answered_at, r = time.perf_counter(), result[0]
        s.stats.observe_handoff("prefill_call", self.answered_at - self.called_at)
        s.stats.observe_handoff("prefill_remote", r.prefill_s)
        if r.started_at:  # wall clocks of two processes (see PrefillResult)
            s.stats.observe_handoff("to_prefill", max(r.started_at - called_at, 0.0))
            s.stats.observe_handoff("from_prefill", max(time.time() - r.replied_at, 0.0))
        if self.receiving is None:
            self._post(r.kv, dest)
        return r.first

    def _post(self, handle: KVHandle, dest: KVDestination) -> None:
        if handle.transfer_id != dest.transfer_id:  # fencing: only this attempt's KV lands
            raise RuntimeError(f"KV of transfer {handle.transfer_id}, expected {dest.transfer_id}")
        s = self.server
        # a receive posted early waits for the prompt too: prefill's bound, then its own
        wait_s = s.spec.prefill_timeout_s + s.spec.kv_transfer_timeout_s

        async def receive() -> None:
            blocks = await asyncio.shield(self._reserving)
            here = msgspec.structs.replace(dest, block_ids=blocks[self.held :])  # the sent ones
            await s.transport.receive(handle, here, s.engine.runner, wait_s)

        self.receiving = asyncio.ensure_future(receive())
        self.receiving.add_done_callback(lambda _: setattr(self, "landed_at", time.perf_counter()))

    async def kv_landed(self) -> None:
        """Wait (``kv_transfer_timeout_s`` at most) for the KV to be in the blocks."""
        s, started = self.server, time.perf_counter()
        s.faults.maybe_fail("kv_transfer", self.req.request_id)
        assert self.receiving is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.receiving), s.spec.kv_transfer_timeout_s)
        except asyncio.CancelledError:
            raise  # the client went away: no retry
        except Exception as e:  # noqa: BLE001 - reported as this attempt's failure
            what = "timed out" if isinstance(e, TimeoutError) else f"failed ({e})"
            raise RuntimeError(f"KV transfer {self.transfer_id} {what}") from e
        # called once the stream asks past the first token (an async generator waits at its
        # yield for that): the KV may have landed long before
        landed = self.landed_at or time.perf_counter()
        ph = s.transport.phases(self.transfer_id) or {}  # same-host clocks (perf_counter)
        for phase, key in (("kv_signal", "signalled"), ("kv_written", "received")):
            if key in ph:
                s.stats.observe_handoff(phase, max(ph[key] - self.answered_at, 0.0))
        s.stats.observe_handoff("kv_after_result", max(landed - self.answered_at, 0.0))
        s.stats.observe_handoff("first_pulled", started - self.answered_at)
        times = {"called": self.called_at, "answered": self.answered_at, "landed": landed}
        trace_file.record("decode replica", self.transfer_id, {**times, "pulled": started})

    def release(self) -> None:
        """Free the blocks unless a request took them; not before a transfer still writing
        into them has ended. Runs on the engine thread after any pending hand-over, so exactly
        one side frees them. A reservation still under way is given back when it completes."""
        if not self._reserving.done():
            self._reserving.cancel()
            return
        if self._reserving.cancelled() or self._reserving.exception() is not None:
            if self.receiving is not None:  # it waited for those blocks, and failed with them
                self.receiving.add_done_callback(lambda f: f.cancelled() or f.exception())
            return
        blocks, aengine = self._reserving.result(), self.server.aengine

        def free(done: asyncio.Future | None = None) -> None:
            if done is not None and not done.cancelled() and done.exception() is not None:
                # an abandoned attempt's transfer: its failure was reported (or moot) already
                log.debug("transfer of an abandoned attempt ended: %s", done.exception())
            aengine.call(lambda e: None if self.handed else e.release(blocks))

        if self.receiving is None:
            free()
        elif self.receiving.done():
            free(self.receiving)
        else:
            self.receiving.add_done_callback(free)
