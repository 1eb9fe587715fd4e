"""Server-sent events: the framing (both ways), and an ASGI response that stops when the client
leaves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

DONE = b"data: [DONE]\n\n"
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer the stream
}


def event(data: bytes) -> bytes:
    """One ``data:`` event; ``data`` is a JSON document (it holds no raw newlines)."""
    return b"data: " + data + b"\n\n"


def read_events(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON documents of a stream's ``data:`` events, read line by line (a client's side),
    up to ``data: [DONE]``."""
    for raw in lines:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            return
        if line.startswith("data: "):
            yield json.loads(line[6:])


class EventStreamResponse:
    """Streams ``events`` as ``text/event-stream``.

    Watches the connection while it streams: when the client disconnects (an
    ``http.disconnect`` message, or ``send`` failing), it stops pulling events and closes the
    iterator with ``aclose()`` at once, so that whatever produces them can cancel its work.
    The iterator is closed on every exit path.
    """

    def __init__(self, events: AsyncIterator[bytes], status_code: int = 200) -> None:
        self.events = events
        self.status_code = status_code

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        headers += [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]

        async def pump() -> None:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": headers}
            )
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        streaming = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
            if streaming.done():
                streaming.result()  # re-raise a failure of the stream itself
        except OSError:
            pass  # the connection is gone (ASGI spec >= 2.4 signals it from send)
        finally:
            for task in (streaming, watching):
                task.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
