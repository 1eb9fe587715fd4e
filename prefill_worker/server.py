"""PrefillServer: the compute-bound half. Batches prompts from every decode replica under a token
budget (long prompts in chunks), samples each prompt's first token, and pushes its KV blocks to
the decode replica that asked, over the KV transport.

``prefill`` streams (call it with ``stream=True``): first ``PrefillAccepted`` as soon as the
prompt is admitted (this replica's id, and where the transport can start a receive before the
prompt ends, its ``KVHandle``); then the ``PrefillResult``. Decode posts its receive on the first
item, so the KV moves the moment the prompt's last step ends, while the result is still on its
way; should the attempt fail, decode's retry avoids this replica.

With the point-to-point KV transport the replica also serves ``prefill`` over a direct line
(``cluster/line_server.py``, its address in the registry), which decode replicas call instead of
going through Serve: two Ray Serve hops of about 2 ms each are off every first token. Serve's
autoscaler does not see those calls, so the replica reports them (``record_autoscaling_stats``)
and the pool's policy (``deploy/prefill_autoscaling.py``) counts them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from pdserve.cluster import trace_file
from pdserve.cluster.errors import KVLayoutMismatch, OverloadedError, RequestError, WorkerError
from pdserve.cluster.kv_transport.kv_peer import WAITING_CALLS, node_ip
from pdserve.cluster.line_server import LineServer
from pdserve.cluster.messages import FirstToken, PrefillAccepted, PrefillRequest, PrefillResult
from pdserve.cluster.model_runner import ModelRunner
from pdserve.cluster.replica import Replica, WorkerSpec
from pdserve.cluster.request_output import RequestOutput
from pdserve.prefill_worker.prefill_engine import PrefillEngine

log = logging.getLogger(__name__)

LINE_ONGOING = "line_ongoing"  # the autoscaling metric: prefill calls open on the direct line


class PrefillServer(Replica):
    engine_cls = PrefillEngine

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self._met: set[str] = set()  # decode replicas whose layout was checked
        self.line: LineServer | None = None
        if spec.direct_line and spec.kv_transport == "nccl":
            self.line = LineServer({"prefill": self.prefill, "kv": self._kv}, node_ip())
            self.stats.line = self.line.address
            if isinstance(self.engine.runner, ModelRunner):  # decode reaches its KV peer here
                self.engine.runner.kv_line = self.line.address
            log.info("%s serves prefill calls on a direct line at %s", self.replica_id,
                     self.line.address)  # fmt: skip

    def snapshot_stats(self):
        s = super().snapshot_stats()
        s.line_calls = self.line.taken["prefill"] if self.line is not None else 0
        return s

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook: the calls its own metrics miss (those on the direct line)."""
        # prefill calls only: each one also has KV peer calls open on the line, which are not load
        return {LINE_ONGOING: float(self.line.open["prefill"] if self.line is not None else 0)}

    def shutdown(self) -> None:
        """Stop taking line calls and let those running end (Serve drains only its own), then
        shut down."""
        if self.line is not None:
            self.stats.line = ""  # decode replicas stop choosing it at the next report
            self._wake.set()
            self.line.close(drain_s=self.spec.prefill_timeout_s)
        super().shutdown()

    async def _kv(self, call: tuple[str, tuple]) -> AsyncIterator[Any]:
        """A decode replica's call to this replica's KV peer (in-process engine only)."""
        name, args = call
        peer = self.engine.runner.kv_peer
        pool = peer.wait_pool if name in WAITING_CALLS else peer.pool
        yield await asyncio.get_running_loop().run_in_executor(pool, peer.call, name, *args)

    async def prefill(self, req: PrefillRequest) -> AsyncIterator[PrefillAccepted | PrefillResult]:
        start, arrived = time.time(), time.perf_counter()
        dest = req.kv
        if not 0 <= dest.first_block < dest.num_blocks:  # at least the last block travels
            raise RequestError(
                f"first_block {dest.first_block} is outside the prompt's {dest.num_blocks} "
                "KV blocks",
                "kv",
            )
        window = self.engine.groups.window_blocks(
            len(req.prompt_token_ids), self.engine.blocks.block_size
        )
        if dest.num_window_blocks != window:  # before announce sizes the transfer by it
            raise RequestError(
                f"decode reserved {dest.num_window_blocks} sliding-window KV blocks; the "
                f"prompt's window fills {window}",
                "kv",
            )
        if dest.decode_replica not in self._met:
            self.fingerprint.check(dest.fingerprint)  # KVLayoutMismatch, at first contact
            self._met.add(dest.decode_replica)
        # one token, sampled with the request's own parameters: the decode side continues it
        sampling = msgspec.structs.replace(req.sampling, max_tokens=1, stop=())
        rid = dest.transfer_id  # unique per attempt, even when a request is retried
        self.stats.inflight += 1
        out = None
        failed: bool | None = None  # see Replica.request_ended
        done = False
        try:
            early = self.transport.announce(self.engine.runner, rid, dest)
            self.faults.maybe_fail("prefill", f"before {req.request_id}")
            # the prompt goes to the engine first; the accepted item travels while it runs
            stream = self.aengine.stream(
                rid,
                lambda e: e.add_prompt(req.prompt_token_ids, sampling, rid, dest.first_block),
            )
            running = asyncio.ensure_future(_last(stream))
            try:
                yield PrefillAccepted(replica=self.serve_id, kv=early)
                out = await running
                prefilled = time.perf_counter()
            finally:
                if not running.done():  # cancelled: the stream's own cleanup aborts the prompt
                    running.cancel()
                    await asyncio.gather(running, return_exceptions=True)
            if out is None or out.finish_reason not in ("stop", "length"):
                raise WorkerError(
                    f"prefill of {req.request_id} ended with {out and out.finish_reason}"
                )
            queue_s = self.engine.captured.pop(rid)
            n, bs = len(req.prompt_token_ids), self.engine.blocks.block_size
            made = (self.engine.blocks.blocks_for(n), self.engine.groups.window_blocks(n, bs))
            if made != (dest.num_blocks, dest.num_window_blocks):
                raise WorkerError(
                    f"prefill made {made} KV blocks (full, sliding), decode reserved "
                    f"{(dest.num_blocks, dest.num_window_blocks)}"
                )
            prefill_s = time.time() - start
            self.stats.ttft.observe(prefill_s)
            sent = time.time()
            handle = await self.transport.send(self.engine.runner, rid, dest)
            self.faults.maybe_fail("prefill", f"after {req.request_id}'s KV went out")
            self.stats.count("ok")
            self.stats.prompt_tokens += len(req.prompt_token_ids)
            failed, done = False, True
        except BaseException as e:
            self.stats.count("error")
            # the caller's doing (cancelled, a bad request, a full queue, a layout it should
            # not have sent here) says nothing about this replica's health
            caller = (RequestError, OverloadedError, KVLayoutMismatch)
            failed = isinstance(e, Exception) and not isinstance(e, caller)
            raise
        finally:
            self.engine.captured.pop(rid, None)
            if not done:  # drop what nobody will pull; a send posted for it gives up now
                await asyncio.to_thread(self.engine.runner.drop_staged, rid)
            self.stats.inflight -= 1
            self.request_ended(failed)
        lp = out.logprobs[0] if out.logprobs else None
        times = {"arrived": arrived, "prefilled": prefilled, "replied": time.perf_counter()}
        trace_file.record("prefill replica", rid, times)
        yield PrefillResult(
            request_id=req.request_id,
            prefill_replica=self.replica_id,
            first=FirstToken(out.token_ids[0], lp and lp.logprob, lp and lp.top),
            kv=handle,
            queue_s=queue_s,
            prefill_s=prefill_s,
            send_s=time.time() - sent,
            started_at=start,
            replied_at=time.time(),
        )


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    last = None
    async for out in stream:
        last = out
    return last
