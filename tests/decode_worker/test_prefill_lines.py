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


def _keys(tokens: list[int]) -> list[bytes]:
    from pdserve.cluster.block_hash import extend_block_hashes

    return extend_block_hashes([], tokens, 4, len(tokens) // 4)


def test_a_prompt_goes_where_its_longest_prefix_went_unless_that_replica_is_busy():
    lines = PrefillLines()
    lines.update([PrefillLine("a", "h:1", 0), PrefillLine("b", "h:2", 0)])
    system = list(range(16))
    first, _ = lines.choose((), _keys(system + [90, 91, 92, 93]))
    for i in range(20):  # every later prompt sharing the system prompt follows it
        assert lines.choose((), _keys(system + [100 + i] * 4))[0] == first
    other = "b" if first == "a" else "a"
    # a conversation's next turn finds its own, longer prefix even on the other replica
    lines.routes.record(_keys(system + [7] * 8), other)
    assert lines.choose((), _keys(system + [7] * 8 + [8] * 4))[0] == other
    # the holder busier than the other by more than the slack: load wins
    address = {"a": "h:1", "b": "h:2"}
    lines.update([PrefillLine(first, address[first], 3), PrefillLine(other, address[other], 0)])
    assert all(lines.choose((), _keys(system + [5] * 4))[0] == other for _ in range(10))
    assert lines.affinity_picks >= 21


def test_routes_forget_the_least_recently_used_keys_beyond_capacity():
    from pdserve.decode_worker.prefix_routes import PrefixRoutes

    routes = PrefixRoutes(capacity=4)
    routes.record(_keys(list(range(12))), "a")  # 3 keys
    routes.record(_keys([50] * 8), "b")  # 2 more: the oldest key goes
    assert len(routes) == 4
    assert routes.longest(_keys(list(range(12))), {"a", "b"}) == ("a", 3)
    assert routes.longest(_keys(list(range(4))), {"a", "b"}) == (None, 0)  # forgotten
    assert routes.longest(_keys([50] * 8), {"a"}) == (None, 0)  # b not among the choices
    assert routes.owned("a") == 2 and routes.owned("b") == 2
    routes.record(_keys([50] * 8), "a")  # b's prefix went to a since
    assert routes.owned("a") == 4 and routes.owned("b") == 0
