"""DecodeServer: the memory-bound half, and the orchestrator of every request.

For each request it:
  1. validates it;
  2. asks a prefill replica (over its direct line where the prefill pool serves one,
     ``prefill_lines.py``, else through Serve; a retry avoids the replicas already tried) to run
     the prompt, naming a transfer id, the number of KV blocks and its own KV layout
     fingerprint, and reserves those blocks meanwhile, or answers "overloaded" (the call is then
     cancelled); the reply streams (``prefill_attempt.py``);
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

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import ray

from pdserve.cluster.engine import LLMEngine
from pdserve.cluster.errors import KVLayoutMismatch, OverloadedError, PrefixEvicted, RequestError
from pdserve.cluster.messages import GenerateRequest, PrefillRequest
from pdserve.cluster.replica import Replica, WorkerSpec
from pdserve.cluster.request_output import RequestOutput
from pdserve.decode_worker.decode_engine import DecodeEngine, Prefilled
from pdserve.decode_worker.prefill_attempt import PrefillAttempt
from pdserve.decode_worker.prefill_lines import PrefillLines

log = logging.getLogger(__name__)


class DecodeServer(Replica):
    engine_cls = DecodeEngine

    def __init__(self, spec: WorkerSpec, prefill=None) -> None:
        """``prefill``: a DeploymentHandle to the prefill pool, or None (colocated)."""
        super().__init__(spec)
        self.prefill = prefill
        # prefill replicas serve a line only with the point-to-point transport
        direct = prefill is not None and spec.kv_transport == "nccl"
        self.lines = PrefillLines() if direct else None

    def after_report(self, registry) -> None:
        if self.lines is not None:
            self.lines.update(ray.get(registry.prefill_lines.remote(), timeout=5))

    def prefill_stream(self, call: PrefillRequest, keys: list[bytes]) -> tuple[str | None, Any]:
        """Send ``call`` to a prefill replica: (its Serve id, the reply stream) over a direct
        line, or (None, Serve's response stream) when no line is left to try. ``keys``: the
        prompt's full-block keys, for the replica likely to cache its prefix."""
        chosen = None
        if self.lines is not None:
            chosen = self.lines.choose(call.avoid, keys)
        if chosen is None:
            return None, self.prefill.options(stream=True).prefill.remote(call)
        serve_id, client = chosen
        return serve_id, client.stream("prefill", call)

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
        spec, entered = self.spec, time.perf_counter()
        self.stats.observe_handoff("to_decode", max(time.time() - req.arrival_time, 0.0))
        errors: list[str] = []
        tried: list[str] = []  # prefill replicas that took an attempt: a retry avoids them
        prefilled: Prefilled | None = None  # once the first token went out
        number, held = 0, True  # attempts failed; whether to count the cached prefix
        while number <= spec.prefill_retries:
            attempt = PrefillAttempt(self, req, number, tried, held)
            called = len(tried)
            try:
                try:
                    first = await attempt.first_token()
                    if prefilled is None:  # the first token goes out now, the KV still moving
                        prefilled = self.engine.first_output(rid, prompt, sampling, first)
                        self.stats.observe_handoff("before_call", attempt.called_at - entered)
                        self.stats.observe_handoff(
                            "first_out", time.perf_counter() - attempt.answered_at
                        )
                        yield prefilled.output
                        if prefilled.output.finished:
                            return
                    # else a retry: the prompt's KV is the same; the token sent stands
                    await attempt.kv_landed()
                except (RequestError, KVLayoutMismatch):
                    raise  # the request or the deployment is wrong: no retry helps
                except PrefixEvicted:
                    # this replica's own cache moved under the attempt, not the prefill
                    # replica's doing: the same attempt again, counting no cached prefix
                    del tried[called:]
                    held = False
                    log.info("%s: a cached prefix block was evicted; sending it whole", rid)
                    continue
                except Exception as e:  # noqa: BLE001 - a failed attempt; the next one may do
                    if attempt.full:
                        raise  # this replica has no room for the prompt: 503 at once
                    errors.append(f"{type(e).__name__}: {e}")
                    log.warning("%s: prefill attempt %d failed: %s", rid, number + 1, errors[-1])
                    self.stats.count("prefill_retry")
                    number += 1
                    continue

                def start(e: DecodeEngine, p: Prefilled = prefilled, a=attempt) -> None:
                    e.adopt(p, a.blocks, a.held)
                    a.handed = True

                async for out in self._joined(rid, start):
                    yield out
                return
            finally:
                attempt.release()
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
