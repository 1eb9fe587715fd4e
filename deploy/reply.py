"""What an endpoint answers: a JSON body with a status, or a stream of server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pdserve.deploy.openai_errors import error_reply
from pdserve.deploy.openai_responses import encode


@dataclass(frozen=True)
class JSONReply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = "application/json"


@dataclass(frozen=True)
class StreamReply:
    """An SSE stream (status 200); its events end with ``data: [DONE]``, after an error event
    if the request failed mid-way. Closing the iterator cancels the generation."""

    events: AsyncIterator[bytes]


Reply = JSONReply | StreamReply


def error_json(e: BaseException) -> JSONReply:
    """The JSON reply for an exception: its status, OpenAI-style body and headers."""
    reply = error_reply(e)
    return JSONReply(reply.status, encode(reply.body), reply.headers)
