"""A prefill attempt does not wait for the decode replica's engine thread: the prefill call goes
out while the KV blocks are still being reserved; a replica with no room cancels the call it
made, and every block comes back on both sides."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pdserve.cluster.errors import OverloadedError
from pdserve.decode_worker.server import DecodeServer
from tests.decode_worker.test_faults import GREEDY, PROMPT, _clean, _decode, setup  # noqa: F401
from tests.decode_worker.test_server import _collect, _PrefillHandle, _spec


class _Watching:
    """A prefill handle that notes, per call, how many reservations the decode engine held."""

    def __init__(self, inner: _PrefillHandle, on_call) -> None:
        self.inner, self.on_call, self.prefill = inner, on_call, self

    def options(self, stream: bool = False):
        return self

    def remote(self, req):
        self.on_call(req)
        return self.inner.prefill.remote(req)


def test_prefill_call_goes_out_before_the_blocks_are_reserved(tiny_model, setup):  # noqa: F811
    prefill, want = setup
    busy = threading.Event()  # the engine thread sits in a long step until the call went out
    seen = []

    def on_call(req):
        seen.append((decode.engine._reserved, req.kv.num_blocks, req.kv.block_ids))
        busy.set()

    decode = _decode(tiny_model, _Watching(_PrefillHandle(prefill), on_call))
    decode.aengine.call(lambda e: busy.wait(10))
    assert asyncio.run(_collect(decode, "early-call", PROMPT, GREEDY)) == want
    assert seen == [(0, 2, [])]  # 30 tokens in blocks of 16; no block ids leave the replica
    _clean(decode, prefill)
    decode.shutdown()


def test_no_room_cancels_the_call_already_made(tiny_model, setup):  # noqa: F811
    prefill, want = setup
    calls = []
    spec = _spec(tiny_model, "decode", "decode", "object_store", 3)
    decode = DecodeServer(spec, _Watching(_PrefillHandle(prefill, delay=0.3), calls.append))

    async def run():
        first = asyncio.create_task(_collect(decode, "holds-2-blocks", PROMPT, GREEDY))
        await asyncio.sleep(0.1)  # its blocks are reserved; its prefill call waits
        with pytest.raises(OverloadedError, match="full"):
            await _collect(decode, "no-room", PROMPT, GREEDY)
        return await first

    assert asyncio.run(run()) == want
    assert len(calls) == 2 and decode.stats.requests.get("prefill_retry") is None
    _clean(decode, prefill)
    decode.shutdown()
