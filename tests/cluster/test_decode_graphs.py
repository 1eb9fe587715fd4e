"""The padded bucket path of decode graphs, run eagerly on CPU: same tokens as plain decode steps,
padding confined to the scratch block. Capture itself runs on GPUs (test_engine_gpu.py)."""

from __future__ import annotations

import random

import pytest

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from pdserve.cluster.decode_graphs import graph_buckets
from pdserve.cluster.scheduler import ScheduledChunk, SchedulerOutput

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _engine(
    path: str, graphs: str, max_batch: int = 4, tp: int = 1, device: str = "auto"
) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=path,
            device=device,
            dtype="float64",  # batch-invariant on CPU: padding may not change a single bit
            tp=tp,
            decode_graphs=graphs,
            decode_graph_max_batch=max_batch,
            cache=CacheConfig(block_size=16, num_blocks=48),
            scheduler=SchedulerConfig(max_num_batched_tokens=64),
        )
    )


def _prompts(vocab: int, n: int) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def _staggered(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens with a request joining every other step: decode batches of every size."""
    rids: dict[str, int] = {}
    done: dict[str, list[int]] = {}
    pending, step = list(range(len(prompts))), 0
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:
            i = pending.pop(0)
            rids[engine.add_request(prompts[i], GREEDY)] = i
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    out = [[] for _ in prompts]
    for rid, i in rids.items():
        out[i] = done[rid]
    return out


def test_buckets():
    assert graph_buckets(1) == (1,)
    assert graph_buckets(6) == (1, 2, 4, 6)
    assert graph_buckets(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert graph_buckets(40) == (1, 2, 4, 8, 16, 32, 40)
    with pytest.raises(ValueError, match="got 0"):
        graph_buckets(0)


@pytest.mark.parametrize("which", ["tiny_model", "gpt_oss_model"])
def test_padded_decode_steps_give_the_tokens_of_plain_steps(which, request, monkeypatch):
    """Both attention families: MLA, and GQA with sinks and a window of 6 tokens."""
    tiny_model = request.getfixturevalue(which)
    plain = _engine(tiny_model, "off")
    prompts = _prompts(plain.vocab_size, 7)
    expected = _staggered(plain, prompts)
    assert plain.runner.graphs is None

    padded = _engine(tiny_model, "eager", max_batch=4)  # 5+ sequences: eager steps
    graphs = padded.runner.graphs
    sizes: list[int] = []
    run = graphs.run
    monkeypatch.setattr(
        graphs, "run", lambda sched, fed=None: sizes.append(len(sched.chunks)) or run(sched, fed)
    )
    assert _staggered(padded, prompts) == expected
    assert {1, 3, 4} <= set(sizes), sizes  # padded (3 -> 4) and exact buckets both ran
    assert padded.blocks.num_used == 0
    # the block manager never sees the scratch block; padding rows wrote only there
    assert padded.blocks.num_blocks == padded.runner.num_blocks == 48
    assert padded.runner.kv_caches.shape[1] == 49
    assert graphs.scratch_block == 48 and padded.runner.kv_caches[:, 48].abs().sum() > 0


def test_padded_decode_steps_under_tp2_give_the_tokens_of_one_process(tiny_model):
    """Every rank pads the same step to the same bucket, so their collectives match: TP=2 rank
    actors (gloo on CPU, whatever the machine has; on GPUs the same path replays graphs with the
    NCCL communicator) give the single process's tokens."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        plain = _engine(tiny_model, "off", device="cpu")
        prompts = _prompts(plain.vocab_size, 7)
        expected = _staggered(plain, prompts)
        tp2 = _engine(tiny_model, "eager", max_batch=4, tp=2, device="cpu")
        assert _staggered(tp2, prompts) == expected
        assert tp2.blocks.num_used == 0
        tp2.runner.shutdown()
    finally:
        if started:
            ray.shutdown()


def test_only_pure_decode_steps_within_the_largest_bucket_fit(tiny_model):
    graphs = _engine(tiny_model, "eager", max_batch=2).runner.graphs

    def chunk(n: int) -> ScheduledChunk:
        return ScheduledChunk("r", tuple(range(5, 5 + n)), 7, (0,), True, GREEDY, 0)

    assert graphs.fits(SchedulerOutput((chunk(1), chunk(1))))
    assert not graphs.fits(SchedulerOutput((chunk(1), chunk(3))))  # a prefill chunk rides along
    assert not graphs.fits(SchedulerOutput((chunk(1),) * 3))  # past the largest bucket
    assert not graphs.fits(SchedulerOutput(()))


def test_unknown_mode_is_refused(tiny_model):
    with pytest.raises(ValueError, match="'sometimes'"):
        _engine(tiny_model, "sometimes")


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_max_batch_is_refused(tiny_model, bad):
    with pytest.raises(ValueError, match=f"got {bad}"):
        _engine(tiny_model, "eager", max_batch=bad)


def planning_stand_in(runner, where=lambda: None) -> tuple[list, list]:
    """An MLA decode that plans on the host (FlashInfer's), stood in on CPU: the plan, set on
    the runner and its graphs, records each step's decode rows (lengths, block tables up to
    each length); the op checks that every call runs on the last plan, then computes with the
    runner's own kernel. Returns (plans, calls): a call's (decode rows, ``where()``)."""
    planned: list[tuple[list[int], list[list[int]]]] = []
    calls: list[tuple[int, object]] = []

    def plan(lens, tables, page, graph_batch=None):
        assert graph_batch is None  # nothing is captured on CPU
        lens = [int(n) for n in lens]
        planned.append((lens, [[int(b) for b in t[: -(-n // page)]] for t, n in zip(tables, lens)]))

    kernel = runner.kernels.mla_decode

    def decode(q, kv_cache, table, seq_lens, scale, v_dim):
        lens = seq_lens.tolist()
        page = kv_cache.shape[1]
        rows = [table[i, : -(-n // page)].tolist() for i, n in enumerate(lens)]
        assert planned and (lens, rows) == planned[-1], "a step ran on another step's plan"
        calls.append((len(lens), where()))
        return kernel(q, kv_cache, table, seq_lens, scale, v_dim)

    runner._plan_decode = plan
    for graphs in (runner.graphs, runner.mixed):
        if graphs is not None:
            graphs.plan = plan
    object.__setattr__(runner.kernels, "mla_decode", decode)  # the layers read it per call
    return planned, calls


def test_a_planning_mla_decode_gets_each_steps_rows_before_the_layers_run(tiny_model):
    """An MLA decode that plans on the host (FlashInfer's) is handed each step's decode rows
    before its layers call it, on the padded graph path and on eager steps (decode rows beside
    prefill chunks): every call's lengths and block tables, up to each length, are the last
    plan's. The plan and the op are stand-ins that record; the tokens stay the plain path's."""
    engine = _engine(tiny_model, "eager", max_batch=4)
    planned, calls = planning_stand_in(engine.runner)
    prompts = _prompts(engine.vocab_size, 7)
    assert _staggered(engine, prompts) == _staggered(_engine(tiny_model, "off"), prompts)
    rows = {n for n, _ in calls}
    assert {1, 4} <= rows, calls  # a graph's batch, and single rows
    assert len(planned) < len(calls)  # one plan per step, for all of its layers
