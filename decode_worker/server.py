"""DecodeServer: the memory-bound half, and the orchestrator of every request.

For each request it:
  1. validates it and reserves KV blocks for the prompt, or answers "overloaded" at once;
  2. asks a prefill replica (Serve picks one) to run the prompt, naming the blocks and its own
     KV layout fingerprint;
  3. collects the KV from the transport and scatters it into the reserved blocks;
  4. adds the request, with the first token prefill sampled, to the running batch, and streams
     its tokens as the engine loop produces them.
With no prefill pool (colocated mode) it prefills locally instead. Cancelling the stream at any
point (the client went away) aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from cluster.engine import LLMEngine, RequestOutput
from cluster.errors import OverloadedError, RequestError
from cluster.messages import GenerateRequest, KVDestination, PrefillRequest
from cluster.replica import Replica, WorkerSpec

log = logging.getLogger(__name__)


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
                stream = self.aengine.stream(
                    req.request_id,
                    lambda e: (
                        e.add_request(req.prompt_token_ids, req.sampling, req.request_id) and None
                    ),
                )
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
            self.request_ended()

    async def _disaggregated(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        prompt, sampling, rid = req.prompt_token_ids, req.sampling, req.request_id
        blocks: list[int] = await self.aengine.run_owned(
            lambda e: e.reserve(len(prompt)), lambda e, ids: e.release(ids)
        )
        dest = KVDestination(
            transfer_id=f"{rid}/{uuid.uuid4().hex[:8]}",
            decode_replica=self.replica_id,
            block_ids=blocks,
            fingerprint=self.fingerprint,
            endpoint=self.transport.endpoint(),
        )
        handed = [False]  # set on the engine thread once the request owns the blocks
        receiving: asyncio.Future | None = None
        try:
            result = await self.prefill.prefill.remote(
                PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling, kv=dest)
            )
            receiving = asyncio.ensure_future(
                self.transport.receive(result.kv, dest, self.engine.runner)
            )
            await asyncio.shield(receiving)

            def start(e: LLMEngine) -> list[RequestOutput]:
                out = e.add_prefilled(rid, prompt, sampling, blocks, result.first)
                handed[0] = True
                return [out]

            async for out in self.aengine.stream(rid, start):
                yield out
        finally:
            # on the engine thread after any pending start(), so exactly one side frees; and not
            # before a transfer still writing into the blocks has ended
            def release(_=None) -> None:
                self.aengine.call(lambda e: None if handed[0] else e.release(blocks))

            if receiving is None or receiving.done():
                release()
            else:
                receiving.add_done_callback(release)
