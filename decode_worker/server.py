"""DecodeServer: the memory-bound half, and the orchestrator of every request.

For each request it:
  1. validates it and reserves KV blocks for the prompt, or answers "overloaded" at once;
  2. asks a prefill replica (Serve picks one; a retry avoids those already tried) to run the
     prompt, naming the blocks, a transfer id and its own KV layout fingerprint; the reply
     streams;
  3. streams the first token prefill sampled as soon as the reply brings it (stop checks and
     text made here, off the engine thread), while the KV still moves;
  4. collects the KV from the transport into the reserved blocks: posted as soon as the prefill
     replica announces the transfer (point to point), so the KV moves the moment the prompt
     ends, or once the result is back (object store);
  5. adds the request to the running batch and streams its tokens as the engine loop makes them.
With no prefill pool (colocated mode) it prefills locally instead.

Failures: a prefill call or a KV transfer that fails or outlasts its timeout is tried again
(``prefill_retries`` more times) with fresh blocks and a fresh transfer id, so data a failed
attempt delivers late lands in blocks nobody else uses (they are released only when that
transfer has ended); a retry after the first token went out keeps that token (the prompt's KV
does not depend on it). When every attempt failed the replica prefills locally
(``local_prefill_fallback``: the prompt, and the first token if it went out) or answers 503.
Cancelling the stream at any point (the client went away) aborts the request and frees its
blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cluster.engine import LLMEngine, Prefilled
from cluster.errors import KVLayoutMismatch, OverloadedError, RequestError
from cluster.messages import (
    FirstToken,
    GenerateRequest,
    KVDestination,
    KVHandle,
    PrefillAccepted,
    PrefillRequest,
    PrefillResult,
)
from cluster.replica import Replica, WorkerSpec
from cluster.request_output import RequestOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Answer:
    """A prefill attempt's reply: the first token, and the transfer its KV comes in."""

    first: FirstToken
    transfer_id: str
    at: float  # time.perf_counter() when the reply came


class DecodeServer(Replica):
    def __init__(self, spec: WorkerSpec, prefill=None) -> None:
        """``prefill``: a DeploymentHandle to the prefill pool, or None (colocated)."""
        super().__init__(spec)
        self.prefill = prefill

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        self.stats.inflight += 1
        outcome = "error"
        try:
            self.engine.validate(req.prompt_token_ids, req.sampling)
            if self.prefill is None:
                stream = self._local(req)
            else:
                stream = self._disaggregated(req)
            last = None
            async for out in stream:
                now = time.time()
                if last is None:
                    self.stats.ttft.observe(now - req.arrival_time)
                else:
                    self.stats.tpot.observe((now - last) / max(len(out.token_ids), 1))
                last = now
                self.stats.output_tokens += len(out.token_ids)
                if out.finished:
                    outcome = "ok" if out.finish_reason in ("stop", "length") else out.finish_reason
                yield out
            self.stats.prompt_tokens += len(req.prompt_token_ids)
        except RequestError:
            outcome = "invalid"
            raise
        except OverloadedError:
            outcome = "overloaded"
            raise
        except BaseException as e:
            if not isinstance(e, Exception):  # cancelled: the client went away
                outcome = "cancelled"
            raise
        finally:
            self.stats.count(outcome)
            self.stats.inflight -= 1
            # only its own failures ("error") and successes say something about its health
            health = {"error": True, "ok": False}
            self.request_ended(health.get(outcome))

    def _local(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        rid = req.request_id
        return self.aengine.stream(
            rid,
            lambda e: e.add_request(req.prompt_token_ids, req.sampling, rid, bounded=True) and None,
        )

    async def _disaggregated(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        prompt, sampling, rid = req.prompt_token_ids, req.sampling, req.request_id
        spec = self.spec
        errors: list[str] = []
        tried: list[str] = []  # prefill replicas that took an attempt: a retry avoids them
        prefilled: Prefilled | None = None  # once the first token went out
        for attempt in range(1 + spec.prefill_retries):
            blocks: list[int] = await self.aengine.run_owned(
                lambda e: e.reserve(len(prompt)), lambda e, ids: e.release(ids)
            )
            handed = [False]  # set on the engine thread once the request owns the blocks
            receiving: list[asyncio.Future] = []  # the attempt's KV receive, once posted
            try:
                try:
                    answer = await self._prefill(req, blocks, attempt, receiving, tried)
                    if prefilled is None:  # the first token goes out now, the KV still moving
                        prefilled = self.engine.first_output(rid, prompt, sampling, answer.first)
                        yield prefilled.output
                        if prefilled.output.finished:
                            return
                    # else a retry: the prompt's KV is the same; the token sent stands
                    await self._kv_landed(req, answer, receiving[0])
                except (RequestError, KVLayoutMismatch):
                    raise  # the request or the deployment is wrong: no retry helps
                except Exception as e:  # noqa: BLE001 - a failed attempt; the next one may do
                    errors.append(f"{type(e).__name__}: {e}")
                    log.warning("%s: prefill attempt %d failed: %s", rid, attempt + 1, errors[-1])
                    self.stats.count("prefill_retry")
                    continue

                def start(
                    e: LLMEngine, p: Prefilled = prefilled, blocks=blocks, handed=handed
                ) -> None:
                    e.adopt(p, blocks)
                    handed[0] = True

                async for out in self._joined(rid, start):
                    yield out
                return
            finally:
                self._release_when_done(blocks, receiving[0] if receiving else None, handed)
        if spec.local_prefill_fallback:
            log.warning("%s: prefill failed %d times; prefilling locally", rid, len(errors))
            self.stats.count("local_prefill")
            if prefilled is None:
                stream = self._local(req)
            else:  # the first token is out: recompute the prompt and it here, then go on
                stream = self._joined(rid, lambda e, p=prefilled: e.adopt(p, None))
            async for out in stream:
                yield out
            return
        raise OverloadedError(f"prefill failed {len(errors)} times: {'; '.join(errors)}", 1.0)

    async def _joined(self, rid: str, start) -> AsyncIterator[RequestOutput]:
        """The outputs after the first token of a request that ``start`` hands to the engine;
        "join" times the wait for the engine thread to take it."""
        asked, took = time.perf_counter(), []

        def begin(e: LLMEngine) -> None:
            start(e)
            took.append(time.perf_counter())

        async for out in self.aengine.stream(rid, begin):
            if took:
                self.stats.observe_handoff("join", took.pop() - asked)
            yield out

    async def _prefill(
        self,
        req: GenerateRequest,
        blocks: list[int],
        attempt: int,
        receiving: list[asyncio.Future],
        tried: list[str],
    ) -> _Answer:
        """One attempt: prefill on some replica other than those ``tried`` (it joins them),
        its KV's receive into ``blocks`` posted (into ``receiving``: the blocks are not free
        before it ended) as soon as the replica announces it, or with the reply."""
        spec = self.spec
        dest = KVDestination(
            transfer_id=f"{req.request_id}/{attempt}-{uuid.uuid4().hex[:8]}",
            decode_replica=self.replica_id,
            block_ids=blocks,
            fingerprint=self.fingerprint,
            endpoint=self.transport.endpoint(),
        )
        call = PrefillRequest(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling=req.sampling,
            kv=dest,
            avoid=tuple(tried),
        )
        # a receive posted early waits for the prompt too: prefill's bound, then its own
        wait_s = spec.prefill_timeout_s + spec.kv_transfer_timeout_s

        def post(handle: KVHandle) -> None:
            if handle.transfer_id != dest.transfer_id:  # fencing: only this attempt's KV lands
                raise RuntimeError(
                    f"KV of transfer {handle.transfer_id}, expected {dest.transfer_id}"
                )
            receiving.append(asyncio.ensure_future(
                self.transport.receive(handle, dest, self.engine.runner, wait_s)
            ))  # fmt: skip

        called, called_at = time.perf_counter(), time.time()
        stream = self.prefill.options(stream=True).prefill.remote(call)
        result: list[PrefillResult] = []

        async def collect() -> None:
            async for item in stream:
                if isinstance(item, PrefillAccepted):
                    tried.append(item.replica)
                    if item.kv is not None:
                        post(item.kv)
                else:
                    result.append(item)

        try:
            await asyncio.wait_for(collect(), spec.prefill_timeout_s)
        finally:
            if not result:
                stream.cancel()  # the prefill replica stops (and drops the prompt's KV)
        if not result:
            raise RuntimeError("the prefill replica's reply ended without a result")
        answered, r = time.perf_counter(), result[0]
        self.stats.observe_handoff("prefill_call", answered - called)
        self.stats.observe_handoff("prefill_remote", r.prefill_s)
        if r.started_at:  # wall clocks of two processes (see PrefillResult)
            self.stats.observe_handoff("to_prefill", max(r.started_at - called_at, 0.0))
            self.stats.observe_handoff("from_prefill", max(time.time() - r.replied_at, 0.0))
        if not receiving:
            post(result[0].kv)
        return _Answer(result[0].first, dest.transfer_id, answered)

    async def _kv_landed(
        self, req: GenerateRequest, answer: _Answer, receiving: asyncio.Future
    ) -> None:
        """Wait (``kv_transfer_timeout_s`` at most) for the attempt's KV to be in its blocks."""
        self.faults.maybe_fail("kv_transfer", req.request_id)
        try:
            await asyncio.wait_for(asyncio.shield(receiving), self.spec.kv_transfer_timeout_s)
        except asyncio.CancelledError:
            raise  # the client went away: no retry
        except Exception as e:  # noqa: BLE001 - reported as this attempt's failure
            what = "timed out" if isinstance(e, TimeoutError) else f"failed ({e})"
            raise RuntimeError(f"KV transfer {answer.transfer_id} {what}") from e
        self.stats.observe_handoff("kv_after_result", time.perf_counter() - answer.at)

    def _release_when_done(
        self, blocks: list[int], receiving: asyncio.Future | None, handed: list[bool]
    ) -> None:
        """Free ``blocks`` unless a request took them; not before a transfer still writing into
        them has ended. Runs on the engine thread after any pending ``start``, so exactly one
        side frees them."""

        def release(done: asyncio.Future | None = None) -> None:
            if done is not None and not done.cancelled() and done.exception() is not None:
                # an abandoned attempt's transfer: its failure was reported (or moot) already
                log.debug("transfer of an abandoned attempt ended: %s", done.exception())
            self.aengine.call(lambda e: None if handed[0] else e.release(blocks))

        if receiving is None:
            release()
        elif receiving.done():
            release(receiving)
        else:
            receiving.add_done_callback(release)
