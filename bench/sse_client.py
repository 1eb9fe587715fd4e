"""An asyncio client for OpenAI-compatible streaming endpoints (aiohttp), timing each chunk.

``stream`` posts one request with ``stream: true`` and fills a RequestRecord: the arrival time
and token count of every chunk that carries output tokens, the usage, and on failure the HTTP
status and the server's message. It never raises for a failed request; the record says why.

Tokens per chunk are ``len(choices[0].token_ids)`` when the server returns token ids
(``return_token_ids``), else 1 for a chunk with non-empty text.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from pdserve.bench.request_record import RequestRecord

_JSON = {"Content-Type": "application/json"}


class SSEClient:
    """One HTTP session to ``base_url`` (e.g. ``http://127.0.0.1:8000``); use as
    ``async with SSEClient(...) as client``. ``max_connections`` 0 means no limit."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        read_timeout_s: float = 600.0,
        max_connections: int = 0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SSEClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=self.read_timeout_s),
            headers=self.headers,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("SSEClient is used outside 'async with'")
        return self._session

    async def model_ids(self) -> list[str]:
        """The ids ``GET /v1/models`` lists; raises RuntimeError on an HTTP error."""
        async with self.session.get(self.base_url + "/v1/models") as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET /v1/models: HTTP {resp.status}: {_message(body)}")
        return [m["id"] for m in json.loads(body)["data"]]

    async def stream(
        self, path: str, body: bytes, record: RequestRecord, token_ids: list[int] | None = None
    ) -> None:
        """POST the JSON ``body`` to ``path`` and time its event stream into ``record``: chunk
        and end times are offsets from the moment of this call. ``token_ids``, if given, gets
        the output token ids the stream carries (``return_token_ids``)."""
        sent = time.perf_counter()
        done = False
        try:
            post = self.session.post(self.base_url + path, data=body, headers=_JSON)
            async with post as resp:
                record.status = resp.status
                if resp.status != 200:
                    body = await resp.read()
                    record.fail(f"HTTP {resp.status}: {_message(body)}", time.perf_counter() - sent)
                    return
                buf = b""
                async for data in resp.content.iter_any():
                    now = round(time.perf_counter() - sent, 6)  # us: short in JSON
                    buf += data
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        line = line.rstrip(b"\r")
                        if not line.startswith(b"data:"):
                            continue  # blank separators, comments, other fields
                        text = line[5:].strip()
                        if text == b"[DONE]":
                            done = True
                            continue
                        error = _take_event(json.loads(text), now, record, token_ids)
                        if error is not None:
                            record.fail(error, now)
                            return
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            record.fail(f"{type(e).__name__}: {e}", time.perf_counter() - sent)
            return
        record.end_s = time.perf_counter() - sent
        if record.output_tokens is None:
            record.output_tokens = sum(record.chunk_tokens)
        if not done:
            record.fail("the stream ended without [DONE]", record.end_s)
        elif not record.chunk_s:
            record.fail("the stream carried no output tokens", record.end_s)
        else:
            record.ok = True


def _take_event(
    event: dict[str, Any], now: float, record: RequestRecord, token_ids: list[int] | None
) -> str | None:
    """Add one parsed ``data:`` event to ``record``; the error message if it is an error."""
    if "error" in event:
        err = event["error"]
        return f"error event: {err.get('message', err) if isinstance(err, dict) else err}"
    usage = event.get("usage")
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens")
        record.output_tokens = usage.get("completion_tokens")
    for choice in event.get("choices") or ():
        if choice.get("index", 0) != 0:
            continue
        ids = choice.get("token_ids")
        if ids is not None:
            n = len(ids)
            if token_ids is not None:
                token_ids.extend(ids)
        else:
            text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            n = 1 if text else 0
        if n:
            record.chunk_s.append(now)
            record.chunk_tokens.append(n)
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
    return None


def _message(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's start."""
    try:
        err = json.loads(body)["error"]
        return str(err["message"] if isinstance(err, dict) else err)
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")
