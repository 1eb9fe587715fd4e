"""A decode replica's choice among the prefill pool's direct lines: never one the request tried,
the less loaded of two, none when every line was tried (the caller then goes through Serve)."""

from __future__ import annotations

import asyncio

from pdserve.cluster.replica_stats import PrefillLine
from pdserve.decode_worker.prefill_lines import PrefillLines


def test_choice_skips_tried_replicas_and_prefers_the_less_loaded():
    lines = PrefillLines()
    assert lines.choose(()) is None  # nothing known yet: through Serve
    lines.update([PrefillLine("a", "10.0.0.1:1", 7), PrefillLine("b", "10.0.0.2:1", 0)])
    for _ in range(20):  # two known: both are sampled, the idle one wins
        serve_id, client = lines.choose(())
        assert serve_id == "b" and client.address == "10.0.0.2:1"
    assert lines.choose(("b",))[0] == "a"
    assert lines.choose(("a", "b")) is None
    assert lines.choose(("b",))[1] is lines.choose(("b",))[1]  # one client per address


def test_calls_open_from_here_count_as_load():
    lines = PrefillLines()
    lines.update([PrefillLine("a", "h:1", 0), PrefillLine("b", "h:2", 0)])
    _, busy = lines.choose(("b",))
    busy._calls.update({1: asyncio.Queue(), 2: asyncio.Queue()})  # two calls open to "a"
    assert all(lines.choose(())[0] == "b" for _ in range(20))


def test_lines_to_replicas_gone_from_the_registry_are_dropped_once_idle():
    lines = PrefillLines()
    lines.update([PrefillLine("a", "h:1", 0), PrefillLine("b", "h:2", 0)])
    _, a = lines.choose(("b",))
    _, b = lines.choose(("a",))
    b._calls[1] = asyncio.Queue()  # a call still open on "b"
    lines.update([PrefillLine("c", "h:3", 0)])
    assert lines.choose(())[0] == "c"
    assert set(lines._clients) == {"h:2", "h:3"}  # "a" dropped; "b" kept until its call ends
    b._calls.clear()
    lines.choose(())
    assert set(lines._clients) == {"h:3"}
