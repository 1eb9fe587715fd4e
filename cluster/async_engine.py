"""Runs an engine's step loop on its own thread and serves it to asyncio code.

Every touch of the engine (add, abort, KV in and out) runs on the engine thread between steps
(a step launched ahead may be running on the device meanwhile), so the engine needs no locks.
The loop turns step n's tokens into text and outputs while the device runs step n + 1. Outputs
travel to per-request asyncio queues. A step that raises fails the requests it held (they get
an error output) and the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pdserve.cluster.engine import LLMEngine
from pdserve.cluster.engine_step import CollectedStep
from pdserve.cluster.errors import WorkerError
from pdserve.cluster.request_output import RequestOutput

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, name: str = "engine") -> None:
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams
        self.steps = 0
        self.busy_s = 0.0  # time spent in steps, for utilization
        self._pending: CollectedStep | None = None  # the last step's tokens, not yet emitted
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---- asyncio side ----

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put((fn, fut))
        return fut

    async def run(self, fn: Callable[[LLMEngine], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    async def run_owned(
        self, fn: Callable[[LLMEngine], Any], undo: Callable[[LLMEngine, Any], None]
    ) -> Any:
        """``run`` for a command that acquires something (KV blocks): if the caller is cancelled
        after the engine thread started the command, ``undo(engine, result)`` gives it back."""
        fut = self.call(fn)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:

            def give_back(f: concurrent.futures.Future) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.call(lambda e: undo(e, f.result()))

            fut.add_done_callback(give_back)
            raise

    async def stream(
        self,
        request_id: str,
        start: Callable[[LLMEngine], list[RequestOutput] | None],
    ) -> AsyncIterator[RequestOutput]:
        """Open request ``request_id``'s output stream, then run ``start`` (which adds the
        request, and may return outputs it produced at once). Yields outputs until the last
        one; if the consumer stops early (a client went away) the request is aborted."""
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already streaming")
            self._streams[request_id] = _Stream(asyncio.get_running_loop(), q)
        finished = False

        def begin(engine: LLMEngine) -> None:
            # delivered from the engine thread, so they precede anything a later step produces
            for out in start(engine) or ():
                self._deliver(out.request_id, out)

        try:
            await self.run(begin)
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.call(lambda e: e.abort(request_id))

    def shutdown(self) -> None:
        self._cmds.put((_STOP, None))
        self._thread.join(timeout=10)

    # ---- engine thread ----

    def _loop(self) -> None:
        while True:
            idle = not self.engine.has_unfinished() and self._pending is None
            try:
                item = self._cmds.get(block=idle, timeout=None if idle else 0)
            except queue.Empty:
                item = None
            while item is not None:
                if item[0] is _STOP:
                    return
                self._run_cmd(*item)
                try:
                    item = self._cmds.get_nowait()
                except queue.Empty:
                    item = None
            if self.engine.has_unfinished() or self._pending is not None:
                self._step()

    def _run_cmd(self, fn: Callable, fut: concurrent.futures.Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(self.engine))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)

    def _step(self) -> None:
        """Launch step n + 1 (planned ahead while step n ran, or planned now), then emit step
        n's outputs while the device runs it (pure decode steps: with CUDA graphs they launch
        without waiting for the GPU, and the step after them is launched too), then wait for
        step n + 1's tokens. Steps that carry a prompt emit step n first: their launch may
        wait for the device, and step n's first tokens should not."""
        start = time.perf_counter()
        engine, pending, self._pending = self.engine, self._pending, None
        try:
            launched = engine.take_ahead()
            if launched is None:
                sched = engine.plan()
                if pending is not None and (
                    sched is None or sched.num_decode_chunks < len(sched.chunks)
                ):
                    done, pending = pending, None
                    self._emit(done)
                launched = None if sched is None else engine.launch(sched)
            if launched is not None and self._cmds.empty():  # else a command waits (a new
                # request, say): the next step is planned after it ran, so it can join at once
                engine.launch_ahead(launched)
            if pending is not None:
                done, pending = pending, None
                self._emit(done)
            if launched is not None:
                self._pending = engine.collect(launched)
        except Exception as e:  # noqa: BLE001
            log.error("engine step failed; failing its requests:\n%s", traceback.format_exc())
            engine.drop_launched()
            if pending is not None:  # tokens already applied: hand them out before the error
                try:
                    self._emit(pending)
                except Exception:  # noqa: BLE001 - its requests fail below
                    log.exception("emitting the last step's outputs failed too")
            self._fail_all(WorkerError(f"engine step failed: {type(e).__name__}: {e}"))
        finally:
            self.busy_s += time.perf_counter() - start
            self.steps += 1

    def _emit(self, collected: CollectedStep) -> None:
        for out in self.engine.emit(collected):
            self._deliver(out.request_id, out)

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self.engine.scheduler.requests):
            self.engine.abort(rid)
            self._deliver(rid, error)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            s = self._streams.get(request_id)
        if s is not None:
            try:
                s.loop.call_soon_threadsafe(s.queue.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is gone
                pass
