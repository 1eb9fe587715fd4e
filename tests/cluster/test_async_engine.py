"""The serving loop: a step's outputs go out while the next step runs, and what streams out is
what the engine gives step by step."""

from __future__ import annotations

import asyncio
import random

import pytest

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from pdserve.cluster.async_engine import AsyncEngine
from pdserve.cluster.engine_step import CollectedStep, LaunchedStep
from pdserve.cluster.errors import WorkerError
from pdserve.cluster.request_output import RequestOutput
from pdserve.cluster.scheduler import SchedulerOutput


def _config(path: str, graphs: str = "off", ahead: bool = True) -> EngineConfig:
    """``graphs="eager"``: decode steps take the graph path (uncaptured), so steps are planned
    ahead unless ``ahead`` is False."""
    return EngineConfig(
        model=path,
        dtype="float32",
        decode_graphs=graphs,
        plan_ahead=ahead,
        cache=CacheConfig(block_size=16),
        scheduler=SchedulerConfig(max_num_batched_tokens=48, max_num_seqs=8),
    )


class RecordingEngine(LLMEngine):
    """The engine, with the order of its step phases written down."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.phases: list[str] = []

    def launch(self, sched: SchedulerOutput, after: LaunchedStep | None = None) -> LaunchedStep:
        kind = "decode" if sched.num_decode_chunks == len(sched.chunks) else "prompt"
        self.phases.append(f"launch {kind}")
        return super().launch(sched, after)

    def collect(self, launched: LaunchedStep) -> CollectedStep:
        self.phases.append("collect")
        return super().collect(launched)

    def emit(self, collected: CollectedStep) -> list[RequestOutput]:
        self.phases.append("emit")
        return super().emit(collected)


def _add(prompt: list[int], sp: SamplingParams, rid: str):
    """A ``stream`` start that adds the request (and hands out no outputs of its own)."""
    return lambda e: e.add_request(prompt, sp, rid) and None


async def _stream_all(aengine: AsyncEngine, prompts, params) -> dict[str, list[RequestOutput]]:
    async def one(i: int) -> tuple[str, list[RequestOutput]]:
        rid = f"r{i}"
        outs = []
        async for out in aengine.stream(rid, _add(prompts[i], params[i], rid)):
            outs.append(out)
        return rid, outs

    return dict(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


def _params(stop: str) -> list[SamplingParams]:
    greedy = dict(temperature=0, ignore_eos=True)
    return [
        SamplingParams(max_tokens=14, **greedy),
        SamplingParams(max_tokens=9, logprobs=2, **greedy),
        SamplingParams(max_tokens=24, stop=(stop,), **greedy),
        SamplingParams(max_tokens=11, temperature=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.8, top_k=5, seed=8, ignore_eos=True),
    ]


@pytest.mark.parametrize("graphs", ["off", "eager"])
def test_the_overlapped_loop_streams_what_step_by_step_gives(tiny_model, graphs):
    """With decode graphs (uncaptured) the loop also plans steps ahead."""
    reference = LLMEngine(_config(tiny_model, graphs, ahead=False))
    rng = random.Random(4)
    prompts = [
        [rng.randrange(4, reference.vocab_size) for _ in range(n)] for n in (5, 30, 9, 60, 17)
    ]
    free = reference.generate([prompts[2]], SamplingParams(max_tokens=24, temperature=0))[0]
    stop = free.text[4:7]  # a stop string the third prompt's greedy text reaches
    params = _params(stop)
    expected = reference.generate(prompts, params)
    aengine = AsyncEngine(RecordingEngine(_config(tiny_model, graphs)))
    try:
        got = asyncio.run(_stream_all(aengine, prompts, params))
    finally:
        aengine.shutdown()
    assert expected[2].finish_reason == "stop" and expected[2].stop_reason == stop
    for i, want in enumerate(expected):
        outs = got[f"r{i}"]
        assert [t for o in outs for t in o.token_ids] == want.token_ids
        assert "".join(o.text for o in outs) == want.text
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert (outs[-1].finish_reason, outs[-1].stop_reason) == (
            want.finish_reason,
            want.stop_reason,
        )
        assert outs[-1].num_output_tokens == len(want.token_ids)
        if want.logprobs is not None:
            assert [lp for o in outs for lp in o.logprobs] == want.logprobs


def _five_tokens(engine: RecordingEngine) -> list[int]:
    """One request's five greedy tokens through the serving loop over ``engine``."""
    aengine = AsyncEngine(engine)
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    try:
        got = asyncio.run(_stream_all(aengine, [[5, 6, 7, 8]], [sp]))
    finally:
        aengine.shutdown()
    return [t for o in got["r0"] for t in o.token_ids]


def test_a_decode_step_launches_before_the_last_step_is_emitted(tiny_model):
    engine = RecordingEngine(_config(tiny_model))
    assert len(_five_tokens(engine)) == 5
    # the prompt step samples the first token; each decode step launches, then the step
    # before it is emitted, then its own tokens are collected; the last is emitted alone
    decode = ["launch decode", "emit", "collect"]
    assert engine.phases == ["launch prompt", "collect", *decode * 4, "emit"]


def test_a_decode_step_planned_ahead_launches_before_the_one_before_is_collected(tiny_model):
    engine = RecordingEngine(_config(tiny_model, "eager"))
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    want = LLMEngine(_config(tiny_model)).generate([[5, 6, 7, 8]], sp)[0].token_ids
    assert _five_tokens(engine) == want
    # the first decode step is planned after the prompt's token; the second, third and fourth
    # are each launched while the one before runs; none follows the fourth (its token is the
    # last by length)
    ahead = ["launch decode", "emit", "collect"]
    assert engine.phases == [
        "launch prompt", "collect", "launch decode", *ahead * 3, "emit", "collect", "emit"
    ]  # fmt: skip
    assert engine.blocks.num_used == engine.blocks.num_parked == 0


def test_a_waiting_command_holds_the_step_ahead_back(tiny_model):
    """A command queued when a step could be launched ahead (a new request, say) runs before
    the next step is planned, so that step can take it in."""

    class Interrupting(RecordingEngine):
        decodes = 0

        def launch(self, sched, after=None):
            launched = super().launch(sched, after)
            if sched.num_decode_chunks == len(sched.chunks) and after is None:
                self.decodes += 1
                if self.decodes == 1:  # the first decode step: a command arrives meanwhile
                    aengine.call(lambda e: self.phases.append("command"))
            return launched

    engine = Interrupting(_config(tiny_model, "eager"))
    aengine = AsyncEngine(engine)
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    try:
        asyncio.run(_stream_all(aengine, [[5, 6, 7, 8]], [sp]))
    finally:
        aengine.shutdown()
    ahead = ["launch decode", "emit", "collect"]
    assert engine.phases == [
        "launch prompt", "collect", "launch decode", "emit", "collect", "command",
        "launch decode", *ahead * 2, "emit", "collect", "emit",
    ]  # fmt: skip


def test_a_step_that_carries_a_prompt_emits_the_last_step_first(tiny_model):
    engine = RecordingEngine(_config(tiny_model))
    aengine = AsyncEngine(engine)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def both() -> None:
        # "b" arrives while "a" decodes: its prompt runs in a step beside a's decode
        a = aengine.stream("a", _add([5, 6, 7, 8], sp, "a"))
        outs = [await anext(a), await anext(a)]
        b = aengine.stream("b", _add([9, 10, 11], sp, "b"))
        outs += [o async for o in b] + [o async for o in a]
        assert len(outs) == 24

    try:
        asyncio.run(both())
    finally:
        aengine.shutdown()
    joined = [i for i, p in enumerate(engine.phases) if p == "launch prompt" and i > 0]
    assert joined, engine.phases  # b's prompt did run while a was decoding
    # a launch that may wait for the device never holds back the tokens already collected
    assert all(engine.phases[i - 1] == "emit" for i in joined), engine.phases


class FailingEngine(LLMEngine):
    """Its second decode step fails to launch."""

    decode_launches = 0

    def launch(self, sched: SchedulerOutput, after: LaunchedStep | None = None) -> LaunchedStep:
        if sched.num_decode_chunks == len(sched.chunks):
            self.decode_launches += 1
            if self.decode_launches == 2:
                raise RuntimeError("launch broke")
        return super().launch(sched, after)


@pytest.mark.parametrize("graphs", ["off", "eager"])
def test_a_failed_launch_delivers_the_collected_tokens_then_the_error(tiny_model, graphs):
    """With decode graphs the failed launch is of a step planned ahead, while the first
    decode step is in flight: that step is dropped uncollected, its blocks freed."""
    aengine = AsyncEngine(FailingEngine(_config(tiny_model, graphs)))
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs: list = []

    async def run() -> None:
        async for out in aengine.stream("r", _add([5, 6, 7], sp, "r")):
            outs.append(out)

    try:
        with pytest.raises(WorkerError, match="launch broke"):
            asyncio.run(run())
        # the prompt step's token and (planned after the tokens) the first decode step's
        # were collected before the failed launch: they reach the client, then the error
        assert [len(o.token_ids) for o in outs] == [1] * (1 + (graphs == "off"))
        assert aengine.engine.blocks.num_used == aengine.engine.blocks.num_parked == 0
        assert not aengine.engine.has_unfinished()
    finally:
        aengine.shutdown()
