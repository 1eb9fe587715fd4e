"""Sends a trace to an OpenAI-compatible server on schedule and collects one RequestRecord per
request.

Every request is a streaming ``POST /v1/completions`` (token-id prompt, exact length) or, with
``chat``, ``POST /v1/chat/completions`` (text prompt), with ``max_tokens`` = its output length,
``ignore_eos``, ``stream_options.include_usage`` and, unless turned off, ``return_token_ids``
(exact tokens per chunk). Request bodies are encoded before the clock starts.

Pacing: request k is started at ``arrival_s`` after the run's start, whatever is in flight; with
a concurrency cap it then waits for a slot, and its latencies count from when it is sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from pdserve.bench.progress import Progress
from pdserve.bench.request_record import RequestRecord
from pdserve.bench.sse_client import SSEClient
from pdserve.bench.trace import Trace, TraceRequest, prompt_text, prompt_token_ids

WARMUP_RUN = 1_000_000  # the prompt stream of warm-up requests: never a measured run's


@dataclass(frozen=True)
class RequestShape:
    """What every request of a run sends, besides its prompt and max_tokens."""

    model: str
    chat: bool = False
    temperature: float = 0.0
    return_token_ids: bool = True
    vocab_high: int = 1000  # prompt ids lie in [MIN_TOKEN_ID, vocab_high)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def body(self, seed: int, run: int, index: int, input_len: int, output_len: int) -> bytes:
        payload: dict = {
            "model": self.model,
            "max_tokens": output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if self.return_token_ids:
            payload["return_token_ids"] = True
        if self.chat:
            text = prompt_text(seed, run, index, input_len)
            payload["messages"] = [{"role": "user", "content": text}]
        else:
            payload["prompt"] = prompt_token_ids(seed, run, index, input_len, self.vocab_high)
        return json.dumps(payload, separators=(",", ":")).encode()


class LoadRunner:
    def __init__(
        self,
        client: SSEClient,
        shape: RequestShape,
        max_concurrency: int | None = None,
        progress: bool = True,
    ) -> None:
        self.client = client
        self.shape = shape
        self.max_concurrency = max_concurrency
        self.progress = progress

    async def run(self, trace: Trace, run: int, desc: str) -> list[RequestRecord]:
        """Send ``trace`` (run number ``run`` of a sweep picks the prompts); one record per
        request, in trace order. Never raises for a failed request."""
        bodies = [
            self.shape.body(trace.seed, run, k, r.input_len, r.output_len)
            for k, r in enumerate(trace.requests)
        ]
        records = [
            RequestRecord(k, r.input_len, r.output_len, scheduled_s=r.arrival_s)
            for k, r in enumerate(trace.requests)
        ]
        bar = Progress(len(records), desc, enabled=self.progress)
        slots = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency else None
        start = time.perf_counter()

        async def send(k: int) -> None:
            rec = records[k]
            rec.sent_s = time.perf_counter() - start
            await self.client.stream(self.shape.path, bodies[k], rec)
            bar.update(rec.ok)

        async def one(k: int) -> None:
            if slots is None:
                await send(k)
            else:
                async with slots:
                    await send(k)

        tasks = []
        try:
            for k, req in enumerate(trace.requests):
                delay = start + req.arrival_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(k)))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            bar.close()
        return records

    async def warmup(self, trace: Trace, n: int) -> list[RequestRecord]:
        """``n`` unmeasured requests, all at once (under the cap), with the lengths of the
        trace's first requests (cycled) and prompts no run sends."""
        reqs = [trace.requests[k % len(trace)] for k in range(n)]
        reqs = tuple(TraceRequest(r.input_len, r.output_len, 0.0) for r in reqs)
        warm = Trace(reqs, trace.seed, trace.source, float("inf"), "fixed")
        return await self.run(warm, WARMUP_RUN, "warmup")


def wall_s(records: list[RequestRecord]) -> float:
    """From the start of the run to the end of its last request."""
    return max(r.sent_s + (r.end_s or 0.0) for r in records)
