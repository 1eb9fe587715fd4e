"""The direct line: calls stream their items, raise what the callee raised, cancel on the
callee when the caller leaves, and fail with ConnectionError when the callee goes away."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.cluster.errors import OverloadedError, RequestError
from pdserve.cluster.line_client import LineClient
from pdserve.cluster.line_protocol import split_address
from pdserve.cluster.line_server import LineServer


class Callee:
    def __init__(self) -> None:
        self.cleaned: list[str] = []
        self.started = asyncio.Event()

    async def count(self, n: int):
        for i in range(n):
            yield i

    async def fail(self, kind: str):
        yield "first"
        if kind == "request":
            raise RequestError("bad prompt", "prompt")
        raise OverloadedError("full", 2.5)

    async def hang(self, name: str):
        try:
            yield "accepted"
            await asyncio.sleep(3600)
        finally:
            self.cleaned.append(name)


@pytest.fixture
def line():
    callee = Callee()
    server = LineServer({"count": callee.count, "fail": callee.fail, "hang": callee.hang})
    yield server, callee
    server.close(drain_s=1)


async def _items(client: LineClient, method: str, arg) -> list:
    return [x async for x in client.stream(method, arg)]


def test_items_stream_in_order_and_calls_share_one_connection(line):
    server, _ = line

    async def main():
        client = LineClient(server.address)
        a, b = await asyncio.gather(_items(client, "count", 5), _items(client, "count", 300))
        assert a == list(range(5)) and b == list(range(300))
        assert client.ongoing == 0
        await client.close()

    asyncio.run(main())
    assert server.ongoing == 0


def test_the_callees_errors_arrive_as_themselves(line):
    server, _ = line

    async def main():
        client = LineClient(server.address)
        got = []
        with pytest.raises(RequestError) as e:
            async for x in client.stream("fail", "request"):
                got.append(x)
        assert got == ["first"] and e.value.param == "prompt"
        with pytest.raises(OverloadedError) as e:
            await _items(client, "fail", "overloaded")
        assert e.value.retry_after_s == 2.5
        with pytest.raises(RuntimeError, match="no line method 'nope'"):
            await _items(client, "nope", None)
        await client.close()

    asyncio.run(main())


def test_a_caller_that_leaves_cancels_the_call_on_the_callee(line):
    server, callee = line

    async def main():
        client = LineClient(server.address)
        stream = client.stream("hang", "left")
        assert await stream.__anext__() == "accepted"
        await stream.aclose()  # as a cancelled caller's generator does
        for _ in range(100):
            if callee.cleaned:
                break
            await asyncio.sleep(0.01)
        # a caller cancelled while it waits: the same
        task = asyncio.ensure_future(_items(client, "hang", "cancelled"))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(100):
            if len(callee.cleaned) == 2:
                break
            await asyncio.sleep(0.01)
        await client.close()

    asyncio.run(main())
    assert callee.cleaned == ["left", "cancelled"]
    assert server.ongoing == 0


def test_a_lost_callee_fails_its_calls_and_the_next_call_reconnects():
    callee = Callee()
    server = LineServer({"hang": callee.hang, "count": callee.count})

    async def main():
        client = LineClient(server.address)
        stream = client.stream("hang", "x")
        assert await stream.__anext__() == "accepted"
        await asyncio.to_thread(server.close, 0.2)  # the callee shuts down: its calls end
        with pytest.raises(ConnectionError):
            await stream.__anext__()
        with pytest.raises(OSError):  # nobody listens any more
            await _items(client, "count", 1)
        again = LineServer({"count": callee.count}, "127.0.0.1")
        try:
            assert await _items(LineClient(again.address), "count", 2) == [0, 1]
        finally:
            again.close(drain_s=1)

    asyncio.run(main())
    assert callee.cleaned == ["x"]


def test_a_closing_server_refuses_new_calls_on_open_connections(line):
    server, callee = line

    async def main():
        client = LineClient(server.address)
        assert await _items(client, "count", 1) == [0]
        server._closing = True  # what close() sets first, before it drains
        with pytest.raises(RuntimeError, match="shutting down"):
            await _items(client, "count", 1)
        await client.close()

    asyncio.run(main())


def test_split_address_names_a_bad_address():
    assert split_address("10.0.0.2:4321") == ("10.0.0.2", 4321)
    with pytest.raises(ValueError, match="'nohost'"):
        split_address("nohost")
