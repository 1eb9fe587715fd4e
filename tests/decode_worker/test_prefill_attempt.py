"""A prefill attempt does not wait for the decode replica's engine thread: the prefill call goes
out while the KV blocks are still being reserved; a replica with no room cancels the call it
made, and every block comes back on both sides. A prompt whose prefix the decode replica caches
(a conversation's next turn) is sent from the first block it lacks: eviction before the
reservation, a failed transfer and a cancelled request sharing the prefix are retried or
cleaned up without a leaked block."""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec
import pytest

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine
from pdserve.cluster.errors import OverloadedError
from pdserve.cluster.messages import GenerateRequest
from pdserve.decode_worker.server import DecodeServer
from tests.decode_worker.test_faults import (  # noqa: F401
    GREEDY,
    PROMPT,
    _clean,
    _decode,
    fail_once,
    setup,
)
from tests.decode_worker.test_server import _collect, _eventually, _keys, _PrefillHandle, _spec


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


TURN_1 = list(range(300, 340))  # 40 tokens; with its 8-token answer, 47 have KV: 2 full blocks


@pytest.fixture(scope="module")
def turns(tiny_model):
    """(turn 1's answer, turn 2's prompt, turn 2's tokens) as one process makes them."""
    ref = LLMEngine(
        EngineConfig(
            model=tiny_model, dtype="float64", device="cpu", cache=CacheConfig(block_size=16)
        )
    )
    answer = ref.generate([TURN_1], GREEDY)[0].token_ids
    second = TURN_1 + answer + list(range(400, 420))  # 68 tokens: 5 blocks, 2 of them held
    return answer, second, ref.generate([second], GREEDY)[0].token_ids


def _after_turn_1(tiny_model, prefill, answer, handle=None, **spec) -> DecodeServer:
    decode = _decode(tiny_model, handle or _PrefillHandle(prefill), **spec)
    assert asyncio.run(_collect(decode, "turn-1", TURN_1, GREEDY)) == answer
    _eventually(lambda: decode.engine.blocks.num_cached == 2)
    return decode


def test_prefix_evicted_after_it_was_counted_is_sent_whole_by_the_same_attempt_again(
    tiny_model,
    setup,  # noqa: F811
    turns,
):
    """Not a prefill failure: no retry is spent (there is none left here, nor a fallback),
    and the prefill replica is not avoided."""
    prefill, _ = setup
    answer, second, want = turns
    seen = []
    decode = _after_turn_1(
        tiny_model,
        prefill,
        answer,
        _Watching(_PrefillHandle(prefill), seen.append),
        prefill_retries=0,
        local_prefill_fallback=False,
    )
    blocks, count = decode.engine.blocks, decode.engine.blocks.count_cached

    def count_then_evict(keys):
        n = count(keys)
        if len(seen) == 1:  # the first attempt of turn 2: the cache is emptied behind its back
            blocks.free(blocks.allocate(blocks.num_free))
        return n

    blocks.count_cached = count_then_evict
    assert asyncio.run(_collect(decode, "turn-2", second, GREEDY)) == want
    assert [r.kv.first_block for r in seen[1:]] == [2, 0]  # counted 2, then sent whole
    assert [r.avoid for r in seen[1:]] == [(), ()]
    assert decode.stats.requests.get("prefill_retry") is None
    assert decode.transport.stats.saved_nbytes == 0
    _clean(decode, prefill)
    decode.shutdown()


def test_failed_transfer_into_a_held_prefix_is_retried_and_the_prefix_stays_cached(
    tiny_model,
    setup,  # noqa: F811
    turns,
):
    prefill, _ = setup
    answer, second, want = turns
    decode = _after_turn_1(tiny_model, prefill, answer)
    fail_once(decode, "kv_transfer")
    assert asyncio.run(_collect(decode, "turn-2", second, GREEDY)) == want
    assert decode.stats.requests.get("prefill_retry") == 1
    t = decode.transport.stats  # both attempts held the 2 blocks; one landed
    assert t.saved_nbytes > 0
    _clean(decode, prefill)
    # turn 2's KV is cached for a turn 3: 67 tokens written, 4 full blocks
    assert decode.engine.blocks.count_cached(_keys(second + want, 4)) == 4
    decode.shutdown()


def test_cancelling_one_of_two_requests_sharing_a_held_prefix_leaks_nothing(
    tiny_model,
    setup,  # noqa: F811
    turns,
):
    prefill, _ = setup
    answer, second, want = turns
    decode = _after_turn_1(tiny_model, prefill, answer)

    streaming = asyncio.Event()

    async def cancelled_midway() -> None:
        sp = msgspec.structs.replace(GREEDY, max_tokens=200)
        req = GenerateRequest(
            request_id="gone", prompt_token_ids=second, sampling=sp, arrival_time=time.time()
        )
        async for _ in decode.generate(req):
            streaming.set()  # decoding from the held prefix

    async def run():
        kept = asyncio.create_task(_collect(decode, "kept", second, GREEDY))
        gone = asyncio.create_task(cancelled_midway())
        await asyncio.wait_for(streaming.wait(), 30)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await kept

    assert asyncio.run(run()) == want
    _clean(decode, prefill)
    assert decode.engine.blocks.count_cached(_keys(second, 2)) == 2
    decode.shutdown()
