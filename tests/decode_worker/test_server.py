"""The PD protocol in one process: a DecodeServer whose prefill "handle" calls a PrefillServer
directly. Covers batching across callers, the layout check, and block accounting when a request
is cancelled at each stage."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from pdserve.cluster import CacheConfig, EngineConfig, SamplingParams
from pdserve.cluster.errors import KVLayoutMismatch, OverloadedError
from pdserve.cluster.messages import GenerateRequest
from pdserve.cluster.replica import WorkerSpec
from pdserve.cluster.replica_stats import HANDOFF, P2P_ONLY
from pdserve.decode_worker.server import DecodeServer
from pdserve.prefill_worker.server import PrefillServer

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


class _Stream:
    """Stands in for Serve's DeploymentResponseGenerator: iterate it, or cancel it."""

    def __init__(self, items) -> None:
        self.items = items

    def __aiter__(self):
        return self.items

    def cancel(self) -> None:
        asyncio.ensure_future(self.items.aclose())


class _Method:
    def __init__(self, fn, delay: float = 0.0) -> None:
        self.fn, self.delay = fn, delay

    def remote(self, req) -> _Stream:
        async def items():
            await asyncio.sleep(self.delay)
            async for item in self.fn(req):
                yield item

        return _Stream(items())


class _PrefillHandle:
    """Stands in for a Serve DeploymentHandle to the prefill pool (its streamed calls)."""

    def __init__(self, server: PrefillServer, delay: float = 0.0) -> None:
        self.prefill = _Method(server.prefill, delay)

    def options(self, stream: bool = False):
        assert stream, "prefill replies stream"
        return self


def _spec(
    model: str, pool: str, role: str, transport: str, blocks: int = 64, **engine
) -> WorkerSpec:
    cache = CacheConfig(block_size=16, num_blocks=blocks)
    # float64: concurrent requests batch unpredictably; float64 keeps tokens batch-invariant
    cfg = EngineConfig(model=model, role=role, dtype="float64", device="cpu", cache=cache, **engine)
    return WorkerSpec("test", pool, cfg, transport, "digest")


def _decode(
    model: str, prefill: PrefillServer, blocks: int = 64, delay: float = 0.0
) -> DecodeServer:
    spec = _spec(model, "decode", "decode", prefill.spec.kv_transport, blocks)
    return DecodeServer(spec, _PrefillHandle(prefill, delay))


@pytest.fixture(scope="module", params=["object_store", "nccl"])
def servers(tiny_model, request):
    """A prefill and a decode server; with the point-to-point transport (gloo on CPU) the prefill
    engine runs in a rank actor that the decode side pulls from."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    actors = request.param == "nccl"
    prefill = PrefillServer(
        _spec(tiny_model, "prefill", "prefill", request.param, rank_actors=actors)
    )
    decode = _decode(tiny_model, prefill)
    yield prefill, decode
    for server in (decode, prefill):
        server.shutdown()
    if started:
        ray.shutdown()


async def _collect(decode: DecodeServer, rid: str, prompt: list[int], sp=GREEDY) -> list[int]:
    req = GenerateRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sp, arrival_time=time.time()
    )
    return [t async for out in decode.generate(req) for t in out.token_ids]


def test_disaggregated_tokens_equal_colocated_and_prefill_batches(servers, tiny_model):
    prefill, decode = servers
    prompts = [[5 + i] * (3 + 11 * i) for i in range(8)]
    ref = decode.engine.__class__(
        EngineConfig(
            model=tiny_model, dtype="float64", device="cpu", cache=CacheConfig(block_size=16)
        )
    )
    want = [o.token_ids for o in ref.generate(prompts, GREEDY)]
    steps_before = prefill.aengine.steps

    async def run():
        return await asyncio.gather(*(_collect(decode, f"r{i}", p) for i, p in enumerate(prompts)))

    assert asyncio.run(run()) == want
    # eight concurrent prompts share prefill steps instead of taking one each
    assert prefill.aengine.steps - steps_before < len(prompts)
    assert decode.engine.blocks.num_used == 0 and prefill.engine.blocks.num_used == 0
    _eventually(lambda: _staged(prefill) == 0)
    assert decode.stats.requests["ok"] >= 8 and decode.transport.stats.transfers >= 8
    # every request's way to its first token is timed, phase by phase
    handoff = decode.stats.handoff
    timed = [p for p in HANDOFF if decode.transport.name == "nccl" or p not in P2P_ONLY]
    assert all(handoff[phase].count >= 8 for phase in timed), handoff
    if decode.transport.name == "nccl":  # gloo here: prefill's word came before the blocks
        assert handoff["kv_signal"].total <= handoff["kv_written"].total
    assert handoff["prefill_remote"].total < handoff["prefill_call"].total  # a part of the call


def test_requests_handed_over_join_decode_steps_planned_ahead(tiny_model):
    """Decode steps on the graph path (uncaptured) are planned ahead; prompts handed over by
    the prefill replica while they run join the next step planned ahead with their first
    token. The tokens are the colocated engine's; every block comes back."""
    prefill = PrefillServer(_spec(tiny_model, "prefill", "prefill", "object_store"))
    spec = _spec(tiny_model, "decode", "decode", "object_store", decode_graphs="eager")
    decode = DecodeServer(spec, _PrefillHandle(prefill))
    joined: list[int] = []
    schedule_ahead = decode.engine.scheduler.schedule_ahead

    def counted(prev, most):
        ahead = schedule_ahead(prev, most)
        if ahead is not None:
            joined.append(len(ahead.chunks) - len(ahead.feed_rows))
        return ahead

    decode.engine.scheduler.schedule_ahead = counted
    prompts = [[5 + i] * (3 + 7 * i) for i in range(6)]
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = decode.engine.__class__(
        EngineConfig(
            model=tiny_model, dtype="float64", device="cpu", cache=CacheConfig(block_size=16)
        )
    )
    want = [o.token_ids for o in ref.generate(prompts, sp)]

    async def staggered():
        async def one(i: int) -> list[int]:
            await asyncio.sleep(0.05 * i)  # each arrives while the others decode
            return await _collect(decode, f"j{i}", prompts[i], sp)

        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    try:
        assert asyncio.run(staggered()) == want
        assert len(joined) > 10 and any(joined), joined
        _eventually(lambda: decode.engine.blocks.num_used == 0)
        assert decode.engine.blocks.num_parked == 0
    finally:
        decode.shutdown()
        prefill.shutdown()


def test_seeded_sampling_continues_across_the_handoff(servers, tiny_model):
    _, decode = servers
    sp = SamplingParams(max_tokens=12, temperature=0.8, seed=42, ignore_eos=True)
    ref = decode.engine.__class__(
        EngineConfig(
            model=tiny_model, dtype="float64", device="cpu", cache=CacheConfig(block_size=16)
        )
    )
    want = ref.generate([[9] * 20], sp)[0].token_ids
    assert asyncio.run(_collect(decode, "seeded", [9] * 20, sp)) == want


def test_layout_mismatch_is_refused_at_first_contact(servers, tiny_model):
    prefill, _ = servers
    other = _decode(tiny_model, prefill)
    other.fingerprint = msgspec.structs.replace(other.fingerprint, block_size=32)
    with pytest.raises(KVLayoutMismatch, match="block_size: 16 vs 32"):
        asyncio.run(_collect(other, "mismatch", [5, 6, 7]))
    _eventually(lambda: other.engine.blocks.num_used == 0)  # the reservation was released
    other.shutdown()


@pytest.mark.parametrize("stage_s", [0.0, 0.05, 0.3])
def test_cancel_at_any_stage_frees_blocks_on_both_sides(servers, stage_s):
    prefill, decode = servers

    async def run():
        task = asyncio.create_task(
            _collect(decode, f"cancel-{stage_s}", [7] * 40, replace_max(200))
        )
        await asyncio.sleep(stage_s)  # before prefill ran, while it runs, while decoding
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)

    asyncio.run(run())
    _eventually(lambda: decode.engine.blocks.num_used == 0 and decode.engine._reserved == 0)
    _eventually(lambda: prefill.engine.blocks.num_used == 0 and not prefill.engine.captured)
    _eventually(lambda: _staged(prefill) == 0)


def _staged(prefill: PrefillServer) -> int:
    """KV copies still staged on the prefill side, over all its ranks."""

    async def count() -> int:
        return sum([await p.call("count") for p in prefill.engine.runner.kv_peers()])

    return asyncio.run(count())


def _eventually(cond, timeout: float = 5.0) -> None:
    """Releases run on the engine thread shortly after the request ends."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not freed in time"
        time.sleep(0.02)


def replace_max(n: int) -> SamplingParams:
    return msgspec.structs.replace(GREEDY, max_tokens=n)


def test_full_decode_replica_answers_overloaded_at_once(tiny_model, servers):
    prefill, _ = servers
    small = _decode(tiny_model, prefill, blocks=4, delay=0.2)

    async def run():
        first = asyncio.create_task(_collect(small, "big", [5] * 50))  # all 4 blocks reserved
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        with pytest.raises(OverloadedError, match="full"):
            await _collect(small, "more", [6] * 10)
        assert time.perf_counter() - start < 0.1
        return await first

    assert len(asyncio.run(run())) == GREEDY.max_tokens
    _eventually(lambda: small.engine.blocks.num_used == 0)
    small.shutdown()


def test_a_conversations_next_turn_sends_only_the_blocks_decode_lacks(servers, tiny_model):
    """Turn 2 resends turn 1's prompt and answer: the decode replica still caches their KV, so
    prefill sends only the blocks after them, and the tokens are those of one process."""
    prefill, decode = servers
    ref = decode.engine.__class__(
        EngineConfig(
            model=tiny_model, dtype="float64", device="cpu", cache=CacheConfig(block_size=16)
        )
    )
    first = list(range(100, 140))  # 40 tokens
    answer = ref.generate([first], GREEDY)[0].token_ids  # 10
    second = first + answer + list(range(200, 220))  # 70 tokens: 5 blocks
    want = ref.generate([second], GREEDY)[0].token_ids
    t, blocks = decode.transport.stats, decode.engine.blocks
    assert asyncio.run(_collect(decode, "turn-1", first)) == answer
    # turn 1 wrote KV for 49 tokens (the last answer token has none): 3 full blocks cached
    _eventually(lambda: blocks.count_cached(_keys(second, 4)) == 3)
    moved, saved = t.nbytes, t.saved_nbytes
    hits = decode.engine.scheduler.num_prefix_hit_tokens
    assert asyncio.run(_collect(decode, "turn-2", second)) == want
    block_bytes = t.nbytes - moved  # turn 2 received 2 blocks
    assert block_bytes > 0 and block_bytes % 2 == 0
    assert t.saved_nbytes - saved == 3 * block_bytes // 2
    assert decode.engine.scheduler.num_prefix_hit_tokens - hits == 3 * 16
    assert decode.engine.blocks.num_used == 0 and prefill.engine.blocks.num_used == 0
    _eventually(lambda: _staged(prefill) == 0)


def _keys(tokens: list[int], n: int) -> list[bytes]:
    from pdserve.cluster.block_hash import extend_block_hashes

    return extend_block_hashes([], tokens, 16, n)
