"""The padded bucket path of mixed-step graphs, run eagerly on CPU: the tokens of plain eager
steps, for fresh prompts, chunked prompts and prefix-cache hits beside decode rows. Capture
itself runs on GPUs (test_engine_gpu.py)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from pdserve.cluster.mixed_graphs import MAX_PREFILLS, mixed_buckets, mixed_graph_mode
from pdserve.cluster.scheduler import ScheduledChunk, SchedulerOutput
from pdserve.kernels import KernelSet
from pdserve.kernels.device import H100
from tests.cluster.test_decode_graphs import _staggered, planning_stand_in

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _engine(path: str, mixed: str, decode: str = "eager", **kw) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=path,
            dtype="float64",  # batch-invariant on CPU: padding may not change a single bit
            decode_graphs=decode,
            decode_graph_max_batch=4,
            mixed_graphs=mixed,
            mixed_graph_max_tokens=kw.pop("max_tokens", 64),
            cache=CacheConfig(block_size=16, num_blocks=64),
            scheduler=SchedulerConfig(max_num_batched_tokens=kw.pop("step_tokens", 64)),
            **kw,
        )
    )


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(5)
    shared = [rng.randrange(4, vocab) for _ in range(20)]  # later prompts hit its first block
    out = [[rng.randrange(4, vocab) for _ in range(n)] for n in (3, 17, 90, 2, 33)]  # 90: chunked
    out += [shared + [rng.randrange(4, vocab) for _ in range(n)] for n in (5, 40, 40)]
    return out


def _again(prompts: list[list[int]]) -> list[list[int]]:
    """Two prompts that share the 20 tokens of ``_prompts``' last three and go on otherwise:
    once those ran, each hits one cached block and prefills 44 tokens after it."""
    tail = [max(4, t - 1) for t in prompts[-1][20:]]
    return [prompts[-1][:20] + tail, prompts[-1][:20] + tail[::-1]]


def test_buckets():
    assert mixed_buckets(64, 1024) == ((0, 4, 16, 64), (16, 32, 64, 128, 256, 512, 1024))
    assert mixed_buckets(128, 100) == ((0, 4, 16, 64, 128), (16, 32, 64, 100))
    assert mixed_buckets(0, 16) == ((0,), (16,))
    assert mixed_buckets(4, 8) == ((0, 4), (8,))
    with pytest.raises(ValueError, match="got -1 and 16"):
        mixed_buckets(-1, 16)


@pytest.mark.parametrize("which", ["tiny_model", "gpt_oss_model"])  # MLA; GQA, sliding layers
def test_padded_mixed_steps_give_the_tokens_of_plain_steps(which, request, monkeypatch):
    model = request.getfixturevalue(which)
    plain = _engine(model, "off")
    prompts = _prompts(plain.vocab_size)
    again = _again(prompts)  # after the first block, cached by the first run
    expected = _staggered(plain, prompts) + _staggered(plain, again)
    assert plain.runner.mixed is None

    padded = _engine(model, "eager")
    mixed = padded.runner.mixed
    assert mixed is not None and not mixed.graphs  # eager: nothing captured
    assert mixed.tables == (2 if which == "gpt_oss_model" else 1)
    keys: list[tuple[int, int]] = []
    starts: list[int] = []  # prefill chunks' first positions: > 0 after a cached prefix

    def run(sched, key):
        keys.append(key)
        starts.extend(c.start for c in sched.chunks[sched.num_decode_chunks :])
        return mixed_run(sched, key)

    mixed_run = mixed.run
    monkeypatch.setattr(mixed, "run", run)
    assert _staggered(padded, prompts) + _staggered(padded, again) == expected
    assert 0 in starts and 16 in starts, str(starts)  # fresh prompts, after a cached block
    assert any(bd > 0 for bd, _ in keys) and any(bd == 0 for bd, _ in keys)  # with decode rows
    assert {tp for _, tp in keys} >= {16, 64}
    # the scratch block took the padding: no request's block was written by it
    assert padded.blocks.num_used == 0


def test_a_planning_mla_decode_gets_each_buckets_rows_first(tiny_model, monkeypatch):
    """An MLA decode that plans on the host (FlashInfer's) is handed a mixed step's decode rows,
    its bucket's padding rows included, before the step's layers call it: every call's lengths
    and block tables, up to each length, are the last plan's. The plan and the op are
    stand-ins that record; the tokens stay the plain path's."""
    engine = _engine(tiny_model, "eager")
    mixed = engine.runner.mixed
    inside = [False]  # in a mixed-graph step

    def run(sched, key):
        inside[0] = True
        try:
            return mixed_run(sched, key)
        finally:
            inside[0] = False

    mixed_run = mixed.run
    monkeypatch.setattr(mixed, "run", run)
    _, calls = planning_stand_in(engine.runner, lambda: inside[0])
    plain = _engine(tiny_model, "off")
    prompts = _prompts(plain.vocab_size)
    assert _staggered(engine, prompts) == _staggered(plain, prompts)
    assert (4, True) in calls, calls  # decode rows beside a chunk, padded to the bucket's 4


def test_prefill_role_runs_prompts_in_mixed_graphs(tiny_model):
    plain = _engine(tiny_model, "off", decode="off", role="prefill")
    padded = _engine(tiny_model, "eager", decode="off", role="prefill")
    assert padded.runner.mixed.row_buckets == (0,)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    prompts = _prompts(plain.vocab_size)[:4]
    assert [o.token_ids for o in padded.generate(prompts, one)] == [
        o.token_ids for o in plain.generate(prompts, one)
    ]


def _chunk(n: int, start: int = 0, sample: bool = True) -> ScheduledChunk:
    blocks = tuple(range(-(-(start + n) // 16)))
    return ScheduledChunk("r", (5,) * n, start, blocks, sample, GREEDY, 0)


def test_steps_outside_the_buckets_run_eagerly(tiny_model):
    mixed = _engine(tiny_model, "eager").runner.mixed  # rows 0, 4; tokens 16, 32, 64
    assert mixed.bucket(SchedulerOutput((_chunk(1), _chunk(1)))) is None  # pure decode
    assert mixed.bucket(SchedulerOutput((_chunk(1), _chunk(20)))) == (4, 32)
    assert mixed.bucket(SchedulerOutput((_chunk(40, start=20),))) == (0, 64)  # 20 before it
    assert mixed.bucket(SchedulerOutput((_chunk(10, start=40),))) == (0, 64)  # context: 50
    assert mixed.bucket(SchedulerOutput((_chunk(10, start=60),))) is None  # context past 64
    assert mixed.bucket(SchedulerOutput((_chunk(65),))) is None
    assert mixed.bucket(SchedulerOutput((*[_chunk(1)] * 5, _chunk(3)))) is None  # 5 rows
    many = tuple(_chunk(2) for _ in range(MAX_PREFILLS + 1))
    assert mixed.bucket(SchedulerOutput(many)) is None
    assert mixed.bucket(SchedulerOutput(many[:-1])) == (0, 16)
    # once captured: a graph where its replay beat the eager step of the tokens' own bucket
    mixed.times = {(b, t): (10.0, t / 10) for b in (0, 4) for t in (16, 32, 64)}
    after = SchedulerOutput((_chunk(10, start=40),))  # 10 tokens (bucket 16) after 40 cached
    assert mixed.bucket(after) == (0, 64)  # replay 6.4 ms against 10 eager
    mixed.times[0, 64] = (10.0, 10.5)
    assert mixed.bucket(after) is None
    assert mixed.bucket(SchedulerOutput((_chunk(60),))) is None  # the same bucket's own eager
    mixed.times[0, 16] = (5.0, 1.6)
    assert mixed.bucket(SchedulerOutput(many[:-1])) == (0, 16)
    mixed.times[0, 16] = (1.5, 1.6)
    assert mixed.bucket(SchedulerOutput(many[:-1])) is None


def test_mode(tiny_model, gpt_oss_model):
    runner = _engine(tiny_model, "eager").runner
    config, kernels = runner.config, runner.kernels
    assert mixed_graph_mode(config, runner.device, True, kernels, False) == "eager"
    # on a GPU, only the attention ops the model calls must be capturable
    gpu, h100 = torch.device("cuda"), KernelSet.resolve(H100, "colocated", {"mla_prefill": "torch"})
    auto_config = dataclasses.replace(config, mixed_graphs="auto")
    assert mixed_graph_mode(auto_config, gpu, True, h100, True) == "capture"  # GQA
    assert mixed_graph_mode(auto_config, gpu, True, h100, False) == "off"  # MLA
    assert mixed_graph_mode(auto_config, gpu, False, h100, True) == "off"  # collectives
    auto = _engine(tiny_model, "auto").runner
    assert auto.mixed_mode == "off" and auto.mixed is None  # CPU
    assert _engine(gpt_oss_model, "eager").runner.mixed.window == 6  # sliding layers
    with pytest.raises(ValueError, match="'sometimes'"):
        _engine(tiny_model, "sometimes")
