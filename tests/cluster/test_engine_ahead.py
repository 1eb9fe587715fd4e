"""Steps planned ahead (``LLMEngine.launch_ahead``): a pure decode step replayed from a decode
graph has the next step planned and launched before its tokens are back. Run here on the padded
graph path without capture (``decode_graphs="eager"``), in float64: the tokens, logprobs and
finish reasons must be those of steps planned after the tokens (logprobs to float64's last
bits), and every block must come back."""

from __future__ import annotations

import random

import msgspec
import pytest

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from pdserve.cluster.scheduler import FED


def _engine(path: str, ahead: bool, num_blocks: int = 48) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=path,
            dtype="float64",
            decode_graphs="eager",
            decode_graph_max_batch=8,
            plan_ahead=ahead,
            cache=CacheConfig(block_size=4, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
        )
    )


def _workload(engine: LLMEngine) -> tuple[list, list[SamplingParams]]:
    """Prompts and parameters whose requests end at different steps: by length (max_tokens from
    3 to 14, so requests in the middle of a batch drop out), two by a stop token id (the second
    token ``engine`` gives them without one), greedy and seeded random, some with logprobs."""
    vocab = engine.vocab_size
    rng = random.Random(11)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(2, 30))] for _ in range(8)]
    params = []
    for i in range(8):
        kw = dict(max_tokens=3 + (5 * i) % 12, ignore_eos=True)
        if i % 2:
            kw.update(temperature=0.8, top_p=0.9, seed=40 + i)
        else:
            kw.update(temperature=0)
        if i % 3 == 0:
            kw.update(logprobs=2)
        params.append(SamplingParams(**kw))
    for i in (2, 5):
        second = engine.generate([prompts[i]], params[i])[0].token_ids[1]
        params[i] = msgspec.structs.replace(params[i], stop_token_ids=(second,))
    return prompts, params


def _counting(engine: LLMEngine) -> list[tuple[int, ...]]:
    """The feed rows of every step the engine launches ahead."""
    rows: list[tuple[int, ...]] = []
    launch = engine.launch

    def counted(sched, after=None):
        if sched.feed_rows is not None:
            rows.append(sched.feed_rows)
            assert all(c.token_ids == (FED,) for c in sched.chunks)
        return launch(sched, after)

    engine.launch = counted
    return rows


@pytest.mark.parametrize("which", ["tiny_model", "gpt_oss_model"])
def test_steps_planned_ahead_give_the_outputs_of_steps_planned_after(which, request):
    """MLA, and GQA with a window of 6 tokens (its sliding blocks let go while steps run)."""
    path = request.getfixturevalue(which)
    after = _engine(path, ahead=False)
    prompts, params = _workload(after)
    expected = after.generate(prompts, params)
    assert after.blocks.num_launched == after.blocks.num_landed

    ahead = _engine(path, ahead=True)
    rows = _counting(ahead)
    got = ahead.generate(prompts, params)
    for e, g in zip(expected, got):
        assert (g.token_ids, g.finish_reason, g.stop_reason, g.text) == (
            e.token_ids,
            e.finish_reason,
            e.stop_reason,
            e.text,
        )
        # a row thrown away changes a step's batch (and padded bucket): float64 sums may move
        # in the last bits
        for a, b in zip(g.logprobs or (), e.logprobs or (), strict=True):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-9)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert len(rows) >= 5, rows
    assert any(r != tuple(range(len(r))) for r in rows), "no request left a batch by length"
    assert [o.finish_reason for i, o in enumerate(got) if i in (2, 5)] == ["stop"] * 2
    assert ahead.blocks.num_used == ahead.blocks.num_parked == 0
    assert not ahead.has_unfinished() and ahead.take_ahead() is None


def test_an_abort_while_a_step_runs_ahead_frees_its_blocks_after_it_lands(tiny_model):
    engine = _engine(tiny_model, ahead=True)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    keep = engine.add_request([9, 8, 7, 6, 5], sp)
    gone = engine.add_request([4, 5, 6], sp)
    tokens: dict[str, list[int]] = {keep: [], gone: []}
    while engine._ahead is None:  # noqa: SLF001 - the state under test
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    held = len(engine.scheduler.requests[gone].block_ids)
    free = engine.blocks.num_free
    assert engine.abort(gone)
    assert engine.blocks.num_parked == held and engine.blocks.num_free == free
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == keep  # the aborted request's row is thrown away
            tokens[keep] += out.token_ids
    assert engine.blocks.num_used == engine.blocks.num_parked == 0
    alone = _engine(tiny_model, ahead=False).generate([[9, 8, 7, 6, 5]], sp)[0]
    assert tokens[keep] == alone.token_ids


def test_a_short_cache_plans_after_the_tokens_and_preempts_as_before(tiny_model):
    """Blocks too few for the step ahead: the engine plans it after the tokens, where the
    scheduler can preempt, and the tokens stay those of a roomy cache."""
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompts = [[4 + i, 5, 6, 7, 8, 9, 10] for i in range(4)]
    roomy = _engine(tiny_model, ahead=True).generate(prompts, sp)
    small = _engine(tiny_model, ahead=True, num_blocks=16)
    rows = _counting(small)
    got = small.generate(prompts, sp)
    assert [o.token_ids for o in got] == [o.token_ids for o in roomy]
    assert small.scheduler.num_preemptions > 0 and rows
    assert small.blocks.num_used == small.blocks.num_parked == 0


def test_a_failed_step_waits_for_the_step_ahead_before_its_blocks_go_back(tiny_model):
    """A step whose collect fails while the step after it runs: the engine waits for the
    device before it hands their blocks back (a transport could write them at once)."""
    engine = _engine(tiny_model, ahead=True)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for prompt in ([9, 8, 7, 6, 5], [4, 5, 6]):
        engine.add_request(prompt, sp)
    while engine._ahead is None:  # noqa: SLF001 - the state under test
        engine.step()
    waited = []
    runner = engine.runner
    runner.synchronize = lambda: waited.append(engine.blocks.num_landed)

    def broken(handle):
        raise RuntimeError("collect broke")

    runner.collect = broken
    with pytest.raises(RuntimeError, match="collect broke"):
        engine.step()
    # the failed step landed; the step launched ahead of it had not when the device was waited on
    assert waited == [engine.blocks.num_launched - 1]
    assert engine.take_ahead() is None and engine.blocks.num_landed == engine.blocks.num_launched
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    assert engine.blocks.num_used == engine.blocks.num_parked == 0
