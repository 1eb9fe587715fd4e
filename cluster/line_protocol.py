"""The frames of a direct line between replicas (``line_server.py``, ``line_client.py``): calls
whose replies stream, many at once on one TCP connection, with no Ray hop between caller and
callee.

Each frame is a 4-byte big-endian length and the pickled frame. Pickle, not msgpack: the
payloads carry what Ray handles can travel as (KV handles naming the prefill ranks' actors).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

import msgspec

from pdserve.cluster.errors import WorkerError

_LEN = struct.Struct(">I")
MAX_FRAME = 256 << 20  # a frame longer than this is a broken peer, not a message


class LineCall(msgspec.Struct, frozen=True):
    """Caller to callee: start call ``call_id`` (unique on its connection) of ``method``."""

    call_id: int
    method: str
    arg: Any


class LineCancel(msgspec.Struct, frozen=True):
    """Caller to callee: the caller stopped reading call ``call_id``; end it (its cleanup runs)."""

    call_id: int


class LineItem(msgspec.Struct, frozen=True):
    """Callee to caller: the next item call ``call_id`` yielded."""

    call_id: int
    item: Any


class LineEnd(msgspec.Struct, frozen=True):
    """Callee to caller: call ``call_id`` ended; ``error`` is what it raised, or None."""

    call_id: int
    error: BaseException | None = None


def encode(frame: msgspec.Struct) -> bytes:
    body = pickle.dumps(frame, protocol=5)
    return _LEN.pack(len(body)) + body


def portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling as itself, else a ``WorkerError`` that names it."""
    try:
        back = pickle.loads(pickle.dumps(e, protocol=5))
        if type(back) is type(e):
            return e
    except Exception:  # noqa: BLE001 - any failure means: send a plain description
        pass
    return WorkerError(f"{type(e).__name__}: {e}")


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame; ``asyncio.IncompleteReadError`` at the end of the stream."""
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise ConnectionError(f"line frame of {n} bytes: the peer is broken")
    return pickle.loads(await reader.readexactly(n))


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"line address {address!r} is not host:port")
    return host, int(port)
