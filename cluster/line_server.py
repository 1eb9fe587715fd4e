"""The callee's end of a direct line: serves streaming calls to ``LineClient``s over TCP, on an
event loop of its own thread, so it answers whichever loop (if any) the replica's own code runs
on. A prefill replica serves ``prefill`` this way: a decode replica's call then costs one TCP
hop each way instead of two Ray Serve hops (about 2 ms each).

Calls on a connection run concurrently; a ``LineCancel`` or a lost connection cancels them (their
cleanup runs, as when a Serve caller goes away). ``close`` stops new calls, lets running ones
end for up to ``drain_s`` seconds, then cancels the rest.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from pdserve.cluster.errors import WorkerError
from pdserve.cluster.line_protocol import (
    LineCall,
    LineCancel,
    LineEnd,
    LineItem,
    encode,
    portable,
    read_frame,
)

log = logging.getLogger(__name__)

Handler = Callable[[Any], AsyncIterator[Any]]


class LineServer:
    def __init__(self, handlers: dict[str, Handler], host: str = "127.0.0.1") -> None:
        """Listen on a free port of ``host`` (``address`` says which) and serve ``handlers``
        (method name -> async generator function of the call's argument)."""
        self.handlers = handlers
        # per method: calls running now, and calls taken ever (read from other threads)
        self.open: Counter[str] = Counter()
        self.taken: Counter[str] = Counter()
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(host, started), name="line-server", daemon=True
        )
        self._thread.start()
        started.wait()
        if self._server is None:
            raise RuntimeError(f"line server could not listen on {host}")
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{host}:{port}"

    @property
    def ongoing(self) -> int:
        """Calls running now, of every method."""
        return sum(self.open.values())

    def _run(self, host: str, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._connection, host, 0)
            )
        except OSError as e:
            log.error("line server: %s", e)
            return
        finally:
            started.set()
        self._loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        calls: dict[int, asyncio.Task] = {}
        lock = asyncio.Lock()  # one frame at a time on the socket
        self._writers.add(writer)

        async def send(frame) -> None:
            async with lock:
                writer.write(encode(frame))
                await writer.drain()

        try:
            while True:
                frame = await read_frame(reader)
                if isinstance(frame, LineCancel):
                    task = calls.get(frame.call_id)
                    if task is not None:
                        task.cancel()
                elif isinstance(frame, LineCall):
                    task = asyncio.ensure_future(self._call(frame, send))
                    calls[frame.call_id] = task
                    self._tasks.add(task)
                    task.add_done_callback(lambda t, c=frame.call_id: calls.pop(c, None))
                    task.add_done_callback(self._tasks.discard)
                else:
                    raise ConnectionError(f"unexpected line frame {type(frame).__name__}")
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            if not isinstance(e, asyncio.IncompleteReadError):
                log.warning("line connection failed: %s", e)
        finally:  # the caller is gone: nobody reads these calls' items any more
            for task in list(calls.values()):
                task.cancel()
            self._writers.discard(writer)
            writer.close()

    async def _call(self, call: LineCall, send) -> None:
        self.open[call.method] += 1
        self.taken[call.method] += 1
        try:
            handler = self.handlers.get(call.method)
            if handler is None:
                raise WorkerError(f"no line method {call.method!r}")
            if self._closing:
                raise WorkerError("this replica is shutting down")
            gen = handler(call.arg)
            try:
                async for item in gen:
                    await send(LineItem(call.call_id, item))
            finally:
                await gen.aclose()
            await send(LineEnd(call.call_id))
        except asyncio.CancelledError:
            pass  # the caller cancelled or went away: there is nobody to tell
        except Exception as e:  # noqa: BLE001 - the caller gets it, as from a Serve call
            try:
                await send(LineEnd(call.call_id, portable(e)))
            except (ConnectionError, OSError):
                pass
        finally:
            self.open[call.method] -= 1

    def close(self, drain_s: float = 30.0) -> None:
        """Stop taking calls; wait up to ``drain_s`` for those running, cancel the rest."""
        if self._closing or not self._thread.is_alive():
            return
        self._closing = True

        async def drain() -> None:
            if self._server is not None:
                self._server.close()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=drain_s)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for writer in list(self._writers):  # callers learn at once that the line is gone
                writer.close()

        try:
            asyncio.run_coroutine_threadsafe(drain(), self._loop).result(drain_s + 5)
        except Exception as e:  # noqa: BLE001 - shutting down regardless
            log.warning("line server drain: %s", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
