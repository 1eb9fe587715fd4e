"""The client side of the SSE framing: what ``event`` writes, ``read_events`` reads back."""

from __future__ import annotations

import json

from pdserve.deploy.sse import DONE, event, read_events


def test_read_events_gives_each_data_event_up_to_done():
    docs = [{"choices": [{"text": "a"}]}, {"error": {"message": "boom"}}]
    wire = b"".join(event(json.dumps(d).encode()) for d in docs) + DONE + event(b'{"late": 1}')
    lines = wire.splitlines(keepends=True)  # as an HTTP response iterates: line by line
    assert list(read_events(lines)) == docs
