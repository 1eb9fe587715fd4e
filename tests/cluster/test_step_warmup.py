"""Start-up warm-up steps: the shapes they cover, and that running them leaves an engine's
cache and tokens as a fresh engine's (on CPU; on GPUs they run before ``WATCH.serving``)."""

from __future__ import annotations

import pytest
import torch

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from pdserve.cluster.step_warmup import token_counts, warmup_steps

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def test_token_counts_meet_each_bucket_and_specialization():
    got = token_counts(8192, 64)
    assert got == sorted(set(got)) and got[0] == 1 and got[-1] == 8192
    for c in (1, 3, 16, 17, 63, 64, 65, 4096, 4097):
        assert c in got
    assert 8193 not in got
    assert token_counts(20, 64) == [1, 3, 16, 17, 20]


@pytest.mark.parametrize("role_decodes", [False, True])
def test_steps_use_disjoint_blocks_that_cover_their_chunks(role_decodes):
    steps = warmup_steps(
        limit=512, crossover=64, block_size=16, num_blocks=1000, max_model_len=4096,
        decodes=role_decodes, graph_max_batch=8, max_num_seqs=32,
    )  # fmt: skip
    for step in steps:
        seen: set[int] = set()
        for c in step.chunks:
            assert len(c.block_ids) * 16 >= c.end and not seen & set(c.block_ids)
            seen |= set(c.block_ids)
        firsts = [len(c.token_ids) == 1 for c in step.chunks]
        assert firsts == sorted(firsts, reverse=True)  # decodes first, as the scheduler does
    single = [s.num_tokens for s in steps if len(s.chunks) == 1 and s.chunks[0].start == 0]
    assert single == token_counts(512, 64)
    assert any(s.chunks[0].start > 0 and len(s.chunks[0].token_ids) > 1 for s in steps)
    decodes = [s for s in steps if all(len(c.token_ids) == 1 and c.start for c in s.chunks)]
    decode_batches = [len(s.chunks) for s in decodes]
    mixed = [s for s in steps if len({len(c.token_ids) for c in s.chunks}) > 1]
    if role_decodes:  # at contexts of 32 and 1024 tokens; 32 rows of 1024 do not fit
        assert decode_batches == [9, 9, 32]
        assert sorted(s.chunks[0].end for s in mixed) == [33, 1025, 4096]  # capped at the length
    else:
        assert decode_batches == [] and mixed == []


def test_steps_that_do_not_fit_the_cache_or_the_length_are_left_out():
    steps = warmup_steps(
        limit=8192, crossover=64, block_size=16, num_blocks=40, max_model_len=300,
        decodes=True, graph_max_batch=0, max_num_seqs=64,
    )  # fmt: skip
    for step in steps:
        assert len({b for c in step.chunks for b in c.block_ids}) <= 40
        assert max(c.end for c in step.chunks) <= 300
    assert max(s.num_tokens for s in steps) <= 300


def test_an_engine_after_its_warm_up_gives_a_fresh_engines_tokens(tiny_model):
    def engine() -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=tiny_model,
                dtype="float32",
                cache=CacheConfig(block_size=16, num_blocks=64),
                scheduler=SchedulerConfig(max_num_batched_tokens=128, max_num_seqs=8),
            )
        )

    prompts = [[5, 9, 11, 40, 7] * 7, [3, 4]]
    want = [o.token_ids for o in engine().generate(prompts, GREEDY)]
    warmed = engine()
    assert warmed.runner.warm_up_steps() > 5
    assert not warmed.runner.kv_caches.any()  # zeroed after the steps
    assert warmed.blocks.num_used == 0
    assert [o.token_ids for o in warmed.generate(prompts, GREEDY)] == want
    assert torch.is_inference_mode_enabled() is False


def test_a_warm_up_step_that_runs_out_of_memory_names_the_setting_to_lower(tiny_model):
    engine = LLMEngine(
        EngineConfig(
            model=tiny_model,
            dtype="float32",
            cache=CacheConfig(block_size=16, num_blocks=64),
            scheduler=SchedulerConfig(max_num_batched_tokens=128, max_num_seqs=8),
        )
    )

    def oom(step, layer_done=None):
        raise torch.OutOfMemoryError("CUDA out of memory")

    engine.runner.compute_logits = oom
    with pytest.raises(RuntimeError, match=r"step of 1 tokens.*max_num_batched_tokens \(128\)"):
        engine.runner.warm_up_steps()
