"""The caller's end of a direct line (``line_server.py``): one TCP connection to one callee,
opened at the first call and again after it was lost, carrying any number of calls at once.

``stream`` yields a call's items and raises what the callee raised; leaving it early (the
caller was cancelled, or stopped reading) tells the callee to cancel the call. A lost
connection fails every call on it with ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

from pdserve.cluster.line_protocol import (
    LineCall,
    LineCancel,
    LineEnd,
    LineItem,
    encode,
    read_frame,
    split_address,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
_SHARED: dict[tuple[int, str], LineClient] = {}  # (event loop id, address) -> client


class LineClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._ids = itertools.count()
        self._calls: dict[int, asyncio.Queue] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task | None = None
        self._connecting = asyncio.Lock()

    @staticmethod
    def shared(address: str) -> LineClient:
        """This event loop's client of ``address`` (made at first use): all callers in a
        process share one connection to a callee."""
        key = (id(asyncio.get_running_loop()), address)
        client = _SHARED.get(key)
        if client is None:
            client = _SHARED[key] = LineClient(address)
        return client

    @property
    def ongoing(self) -> int:
        """Calls this client has open now."""
        return len(self._calls)

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if not self.connected:
                host, port = split_address(self.address)
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
                )
                self._writer = writer
                self._reading = asyncio.ensure_future(self._read(reader, writer))
            return self._writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        why: BaseException = ConnectionError(f"line to {self.address} closed")
        try:
            while True:
                frame = await read_frame(reader)
                q = self._calls.get(frame.call_id)
                if q is not None:  # else a call its caller left already
                    q.put_nowait(frame)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            if not isinstance(e, asyncio.IncompleteReadError):
                why = ConnectionError(f"line to {self.address} failed: {e}")
        except Exception as e:  # noqa: BLE001 - an undecodable frame: the line is unusable
            why = ConnectionError(f"line to {self.address}: bad frame ({e})")
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            for q in self._calls.values():
                q.put_nowait(ConnectionError(str(why)))

    async def stream(self, method: str, arg: Any) -> AsyncIterator[Any]:
        """Call ``method(arg)`` on the callee; its items, as they come."""
        writer = await self._connect()
        call_id = next(self._ids)
        q: asyncio.Queue = asyncio.Queue()
        self._calls[call_id] = q
        ended = False
        try:
            writer.write(encode(LineCall(call_id, method, arg)))
            await writer.drain()
            while True:
                frame = await q.get()
                if isinstance(frame, BaseException):
                    ended = True
                    raise frame
                if isinstance(frame, LineEnd):
                    ended = True
                    if frame.error is not None:
                        raise frame.error
                    return
                assert isinstance(frame, LineItem)
                yield frame.item
        finally:
            del self._calls[call_id]
            if not ended and self._writer is writer and self.connected:
                try:
                    writer.write(encode(LineCancel(call_id)))
                except (ConnectionError, OSError):
                    pass

    def drop(self) -> None:
        """Close the connection (calls still on it fail with ``ConnectionError``)."""
        if self._writer is not None:
            self._writer.close()

    async def close(self) -> None:
        self.drop()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)
