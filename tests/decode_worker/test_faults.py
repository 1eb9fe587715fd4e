"""The decode replica's answers to failures, in one process: prefill faults and timeouts are
retried with fresh blocks, then served by a local prefill or refused with 503 within seconds;
an injected decode-step fault fails its requests cleanly; a full colocated replica says so at
once. Every block comes back, on both sides."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams
from pdserve.cluster.errors import OverloadedError, RequestError, WorkerError
from pdserve.cluster.faults import FaultInjector
from pdserve.cluster.messages import GenerateRequest, PrefillAccepted
from pdserve.decode_worker.server import DecodeServer
from tests.decode_worker.test_server import (
    _collect,
    _eventually,
    _PrefillHandle,
    _spec,
    _staged,
    _Stream,
)

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = [11] * 30


class _Flaky:
    """A prefill handle whose first ``fail`` calls raise, or all of them when ``fail`` < 0."""

    def __init__(self, inner: _PrefillHandle, fail: int, error=RuntimeError) -> None:
        self.inner, self.fail, self.error, self.calls = inner, fail, error, 0
        self.prefill = self

    def options(self, stream: bool = False):
        return self

    def remote(self, req) -> _Stream:
        self.calls += 1
        if self.fail < 0 or self.calls <= self.fail:
            call = self.calls

            async def failing():
                raise self.error(f"prefill replica failed (call {call})")
                yield

            return _Stream(failing())
        return self.inner.prefill.remote(req)


@pytest.fixture(scope="module")
def setup(tiny_model):
    """A prefill server (object store), and the tokens a single process makes for PROMPT."""
    import ray

    from pdserve.prefill_worker.server import PrefillServer

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    prefill = PrefillServer(_spec(tiny_model, "prefill", "prefill", "object_store"))
    ref = LLMEngine(
        EngineConfig(
            model=tiny_model, dtype="float64", device="cpu", cache=CacheConfig(block_size=16)
        )
    )
    want = ref.generate([PROMPT], GREEDY)[0].token_ids
    yield prefill, want
    prefill.shutdown()
    if started:
        ray.shutdown()


def _decode(model: str, handle, **spec) -> DecodeServer:
    base = _spec(model, "decode", "decode", "object_store")
    return DecodeServer(dataclasses.replace(base, **spec), handle)


def fail_once(decode: DecodeServer, point: str) -> None:
    """Inject one fault at ``point`` into ``decode``: its first check there fails, later ones
    pass."""
    decode.faults = FaultInjector({point: 1.0})
    original, calls = decode.faults.maybe_fail, []

    def once(where, what=""):
        calls.append(where)
        if len(calls) == 1:
            original(where, what)

    decode.faults.maybe_fail = once


def _clean(decode: DecodeServer, prefill) -> None:
    _eventually(lambda: decode.engine.blocks.num_used == 0 and decode.engine._reserved == 0)
    _eventually(lambda: prefill.engine.blocks.num_used == 0 and _staged(prefill) == 0)


def test_prefill_fault_is_retried_with_fresh_blocks(tiny_model, setup):
    prefill, want = setup
    handle = _Flaky(_PrefillHandle(prefill), fail=1)
    decode = _decode(tiny_model, handle)
    assert asyncio.run(_collect(decode, "retry", PROMPT, GREEDY)) == want
    assert handle.calls == 2 and decode.stats.requests.get("prefill_retry") == 1
    _clean(decode, prefill)
    decode.shutdown()


class _TwoReplicas:
    """Two prefill replicas behind a router that avoids what a request names (as
    ``deploy/prefix_router.py`` does): "bad", which admits the prompt and then fails, looks
    least loaded and is picked unless avoided; the other is the real prefill server."""

    def __init__(self, good: _PrefillHandle) -> None:
        self.good, self.prefill, self.avoids = good, self, []

    def options(self, stream: bool = False):
        return self

    def remote(self, req) -> _Stream:
        self.avoids.append(req.avoid)
        if "bad" in req.avoid:
            return self.good.prefill.remote(req)

        async def fails_after_admitting():
            yield PrefillAccepted(replica="bad", kv=None)
            raise RuntimeError("replica bad: its GPU fell off the bus")

        return _Stream(fails_after_admitting())


def test_prefill_fault_retry_goes_to_another_replica(tiny_model, setup):
    prefill, want = setup
    handle = _TwoReplicas(_PrefillHandle(prefill))
    decode = _decode(tiny_model, handle, local_prefill_fallback=False)
    assert asyncio.run(_collect(decode, "elsewhere", PROMPT, GREEDY)) == want
    assert handle.avoids == [(), ("bad",)]  # the retry named the replica that failed
    _clean(decode, prefill)
    decode.shutdown()


def test_prefill_fault_every_time_falls_back_to_a_local_prefill(tiny_model, setup):
    prefill, want = setup
    decode = _decode(tiny_model, _Flaky(_PrefillHandle(prefill), fail=-1))
    assert asyncio.run(_collect(decode, "local", PROMPT, GREEDY)) == want
    assert decode.stats.requests.get("local_prefill") == 1
    _clean(decode, prefill)
    decode.shutdown()


def test_prefill_fault_without_fallback_is_a_503_within_seconds(tiny_model, setup):
    prefill, _ = setup
    decode = _decode(
        tiny_model, _Flaky(_PrefillHandle(prefill), fail=-1), local_prefill_fallback=False
    )
    start = time.perf_counter()
    with pytest.raises(OverloadedError, match="prefill failed 2 times"):
        asyncio.run(_collect(decode, "refused", PROMPT, GREEDY))
    assert time.perf_counter() - start < 5
    _clean(decode, prefill)
    decode.shutdown()


def test_prefill_timeout_fails_that_attempt_only(tiny_model, setup):
    prefill, want = setup
    slow = _PrefillHandle(prefill, delay=2.0)  # every call outlasts the 0.3 s timeout
    decode = _decode(tiny_model, slow, prefill_timeout_s=0.3)
    fast = _decode(tiny_model, _PrefillHandle(prefill))

    async def run():
        start = time.perf_counter()
        slow_tokens, fast_tokens = await asyncio.gather(
            _collect(decode, "slow", PROMPT, GREEDY), _collect(fast, "fast", PROMPT, GREEDY)
        )
        return slow_tokens, fast_tokens, time.perf_counter() - start

    slow_tokens, fast_tokens, took = asyncio.run(run())
    assert slow_tokens == fast_tokens == want  # two timeouts, then the local prefill
    assert took < 5 and decode.stats.requests.get("prefill_retry") == 2
    for d in (decode, fast):
        _clean(d, prefill)
        d.shutdown()


def test_kv_transfer_fault_is_retried(tiny_model, setup):
    prefill, want = setup
    decode = _decode(tiny_model, _PrefillHandle(prefill))
    fail_once(decode, "kv_transfer")
    assert asyncio.run(_collect(decode, "kv-retry", PROMPT, GREEDY)) == want
    assert (
        decode.stats.requests.get("prefill_retry") == 1
        and decode.faults.injected["kv_transfer"] == 1
    )
    _clean(decode, prefill)
    decode.shutdown()


def test_first_token_streams_before_the_kv_lands(tiny_model, setup):
    """The first token goes out with the prefill reply; the KV receive, held back here until
    the consumer has that token, comes after."""
    prefill, want = setup
    decode = _decode(tiny_model, _PrefillHandle(prefill))
    receive = decode.transport.receive

    async def run():
        first_out = asyncio.Event()
        order = []

        async def held_back(*args, **kwargs):
            await asyncio.wait_for(first_out.wait(), 5)
            order.append("kv")
            return await receive(*args, **kwargs)

        decode.transport.receive = held_back
        req = GenerateRequest(
            request_id="early", prompt_token_ids=PROMPT, sampling=GREEDY, arrival_time=time.time()
        )
        tokens = []
        async for out in decode.generate(req):
            if not tokens:
                order.append("first token")
                first_out.set()
            tokens += out.token_ids
        return tokens, order

    tokens, order = asyncio.run(run())
    assert tokens == want and order == ["first token", "kv"]
    _clean(decode, prefill)
    decode.shutdown()


def test_kv_fault_after_the_first_token_falls_back_to_recomputing_it_locally(tiny_model, setup):
    """Every KV transfer fails after the first token went out: the local prefill recomputes the
    prompt and that token and goes on from there; the stream matches a single process."""
    prefill, want = setup
    decode = _decode(tiny_model, _PrefillHandle(prefill))
    decode.faults = FaultInjector({"kv_transfer": 1.0})
    assert asyncio.run(_collect(decode, "kv-local", PROMPT, GREEDY)) == want
    assert decode.stats.requests.get("prefill_retry") == 2
    assert decode.stats.requests.get("local_prefill") == 1
    _clean(decode, prefill)
    decode.shutdown()


def test_kv_fault_after_the_first_token_without_fallback_ends_the_stream_with_an_error(
    tiny_model, setup
):
    prefill, want = setup
    decode = _decode(tiny_model, _PrefillHandle(prefill), local_prefill_fallback=False)
    decode.faults = FaultInjector({"kv_transfer": 1.0})

    async def run():
        got = []
        req = GenerateRequest(
            request_id="kv-none", prompt_token_ids=PROMPT, sampling=GREEDY, arrival_time=time.time()
        )
        with pytest.raises(OverloadedError, match="prefill failed 2 times"):
            async for out in decode.generate(req):
                got += out.token_ids
        return got

    assert asyncio.run(run()) == want[:1]  # the token that went out before the KV failed
    _clean(decode, prefill)
    decode.shutdown()


def test_decode_step_fault_fails_its_requests_cleanly_and_serving_goes_on(tiny_model, setup):
    prefill, want = setup
    decode = _decode(tiny_model, _PrefillHandle(prefill))
    decode.engine.faults = FaultInjector({"decode_step": 1.0})
    with pytest.raises(WorkerError, match="InjectedFault: injected decode_step fault"):
        asyncio.run(_collect(decode, "step-fault", PROMPT, GREEDY))
    _clean(decode, prefill)
    decode.engine.faults = None
    assert asyncio.run(_collect(decode, "after", PROMPT, GREEDY)) == want
    decode.shutdown()


def test_full_colocated_replica_is_overloaded_at_once(tiny_model):
    base = _spec(tiny_model, "decode", "colocated", "object_store")
    engine = dataclasses.replace(
        base.engine,
        scheduler=dataclasses.replace(base.engine.scheduler, max_num_seqs=1, max_waiting=1),
    )
    decode = DecodeServer(dataclasses.replace(base, engine=engine))
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def until(cond) -> None:
        while not cond():
            await asyncio.sleep(0.01)

    async def run():
        sched = decode.engine.scheduler
        first = asyncio.create_task(_collect(decode, "a", PROMPT, long))
        await until(lambda: len(sched.running) == 1)  # a runs: the one running slot
        second = asyncio.create_task(_collect(decode, "b", PROMPT, long))
        await until(lambda: len(sched.waiting) == 1)  # b waits: the one waiting slot
        start = time.perf_counter()
        with pytest.raises(OverloadedError, match="wait for a slot"):
            await _collect(decode, "c", PROMPT, long)
        assert time.perf_counter() - start < 0.5
        first.cancel()
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)

    asyncio.run(run())
    _eventually(lambda: decode.engine.blocks.num_used == 0)
    decode.shutdown()


def test_fault_streak_makes_a_prefill_replica_fail_its_health_check(tiny_model, setup):
    """A replica that fails every request asks Serve to replace it; one success resets it."""
    prefill, _ = setup
    streak = dataclasses.replace(prefill.spec, max_consecutive_failures=3, failure_streak_s=0)
    prefill.spec, saved = streak, prefill.spec
    decode = _decode(tiny_model, _PrefillHandle(prefill), local_prefill_fallback=True)
    try:
        prefill.faults = FaultInjector({"prefill": 1.0})
        for i in range(2):  # each request: two failed prefill attempts, then a local prefill
            asyncio.run(_collect(decode, f"streak-{i}", PROMPT, GREEDY))
        assert prefill.failure_streak == 4
        with pytest.raises(RuntimeError, match="last 4 requests failed, over 0s"):
            prefill.check_health()
        decode.check_health()  # the decode replica served both: healthy
        prefill.faults = FaultInjector({})
        asyncio.run(_collect(decode, "streak-ok", PROMPT, GREEDY))
        assert prefill.failure_streak == 0
        prefill.check_health()
        _clean(decode, prefill)
    finally:
        prefill.spec, prefill.faults = saved, FaultInjector({})
        decode.shutdown()


def test_fault_streak_of_bad_requests_leaves_health_alone(tiny_model, setup):
    prefill, _ = setup
    decode = _decode(
        tiny_model, _PrefillHandle(prefill), max_consecutive_failures=1, failure_streak_s=0
    )
    for _ in range(3):  # more than the cache can hold: the caller's problem, not the replica's
        with pytest.raises(RequestError, match="the cache holds 64"):
            asyncio.run(_collect(decode, "huge", [5] * 2000, GREEDY))
    assert decode.failure_streak == 0
    decode.check_health()
    decode.shutdown()


def test_fault_burst_of_one_failed_step_does_not_trip_the_health_check(tiny_model, setup):
    """One injected decode-step fault fails the whole batch at once: many failures in a row,
    but within an instant, so the replica stays in service."""
    prefill, want = setup
    decode = _decode(tiny_model, _PrefillHandle(prefill), max_consecutive_failures=2)
    decode.engine.faults = FaultInjector({"decode_step": 1.0})

    async def batch():
        runs = [_collect(decode, f"burst-{i}", PROMPT, GREEDY) for i in range(4)]
        return await asyncio.gather(*runs, return_exceptions=True)

    assert all(isinstance(r, WorkerError) for r in asyncio.run(batch()))
    assert decode.failure_streak == 4
    decode.check_health()  # 4 >= 2 failures, but not over 30 s
    decode.engine.faults = None
    assert asyncio.run(_collect(decode, "after-burst", PROMPT, GREEDY)) == want
    assert decode.failure_streak == 0
    _clean(decode, prefill)
    decode.shutdown()


def test_fault_a_stopped_tensor_parallel_group_fails_the_health_check(tiny_model, setup):
    """An executor that can run no more steps (a tensor-parallel group stopped after a rank
    failed mid-step: tests/cluster/test_tp_executor.py) makes the replica ask Serve for a new
    one, with the reason."""
    prefill, _ = setup
    decode = _decode(tiny_model, _PrefillHandle(prefill))
    decode.check_health()
    decode.engine.runner.stopped = "the tensor-parallel group was stopped: rank 1 failed"
    with pytest.raises(RuntimeError, match="group was stopped: rank 1 failed"):
        decode.check_health()
    decode.shutdown()
