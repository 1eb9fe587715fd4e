"""Continuous batching, abort, preemption, stopping and sampling through the whole engine."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _engine(path: str, **sched) -> LLMEngine:
    blocks = sched.pop("num_blocks", None)
    return LLMEngine(
        EngineConfig(
            model=path,
            dtype="float32",
            cache=CacheConfig(block_size=16, num_blocks=blocks),
            scheduler=SchedulerConfig(**{"max_num_batched_tokens": 48, **sched}),
        )
    )


def _prompts(vocab: int, n: int, seed: int, lo: int = 1, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _run(engine: LLMEngine, ids: dict[str, int], done: dict[str, list[int]]) -> None:
    for out in engine.step():
        done.setdefault(out.request_id, []).extend(out.token_ids)


@pytest.fixture(scope="module")
def alone(tiny_model):
    """Each prompt's greedy tokens when it runs by itself."""
    engine = _engine(tiny_model)
    prompts = _prompts(engine.vocab_size, 10, seed=7)
    return prompts, [engine.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_requests_joining_mid_batch_match_running_alone(tiny_model, alone):
    prompts, expected = alone
    engine = _engine(tiny_model)
    rids: dict[str, int] = {}
    done: dict[str, list[int]] = {}
    pending = list(range(len(prompts)))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 3 == 0:  # a new request every third step, mid-way through others
            i = pending.pop(0)
            rids[engine.add_request(prompts[i], GREEDY)] = i
        _run(engine, rids, done)
        step += 1
    for rid, i in rids.items():
        assert done[rid] == expected[i], f"prompt {i}"
    assert engine.blocks.num_used == 0


def test_abort_at_any_point_frees_every_block(tiny_model):
    engine = _engine(tiny_model, max_num_batched_tokens=32)
    rng = random.Random(3)
    prompts = _prompts(engine.vocab_size, 12, seed=11, hi=120)
    live = [engine.add_request(p, GREEDY) for p in prompts]
    while engine.has_unfinished():
        engine.step()
        # abort queued, half-prefilled and decoding requests alike
        if live and rng.random() < 0.5:
            victim = live.pop(rng.randrange(len(live)))
            engine.abort(victim)
            assert victim not in engine.scheduler.requests
    assert engine.blocks.num_used == 0
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.abort("no-such-request")


def test_preemption_under_a_small_cache_keeps_tokens(tiny_model, alone):
    prompts, expected = alone
    # 20 blocks of 16 tokens cannot hold ten requests of up to 100 tokens: some get preempted
    engine = _engine(tiny_model, num_blocks=20)
    outs = engine.generate(prompts, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert engine.blocks.num_used == 0


def test_chunk_sizes_do_not_change_tokens(tiny_model, alone):
    prompts, expected = alone
    for budget, cap in ((7, 0), (4096, 0), (256, 5)):
        engine = _engine(
            tiny_model, max_num_batched_tokens=budget, long_prefill_token_threshold=cap
        )
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected


def test_max_tokens_stop_token_ids_and_eos(tiny_model):
    engine = _engine(tiny_model)
    prompt = _prompts(engine.vocab_size, 1, seed=5, lo=20, hi=20)[0]
    free = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[
        0
    ]
    assert len(free.token_ids) == 8 and free.finish_reason == "length"
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    out = engine.generate(
        [prompt],
        SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(stop_at,), ignore_eos=True),
    )[0]
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # the same token as an end-of-sequence id stops too, unless ignore_eos
    engine.eos_ids.add(stop_at)
    eos = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
    assert eos.token_ids == free.token_ids[: first + 1] and eos.stop_reason is None


def test_stop_strings_truncate_text_and_stream_without_leaking(tiny_model):
    engine = _engine(tiny_model)
    prompt = "The model and the cache"
    free = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[
        0
    ]
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    out = engine.generate(
        [prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,))
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = engine.generate(
        [prompt],
        SamplingParams(
            max_tokens=24,
            temperature=0,
            ignore_eos=True,
            stop=(stop,),
            include_stop_str_in_output=True,
        ),
    )[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_streamed_text_equals_full_decode(tiny_model):
    engine = _engine(tiny_model)
    prompts = _prompts(engine.vocab_size, 8, seed=21)
    sp = SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
    for out in engine.generate(prompts, sp):
        assert out.text == engine.tokenizer.decode(out.token_ids)


def test_seeded_sampling_is_independent_of_batch(tiny_model):
    engine = _engine(tiny_model)
    prompts = _prompts(engine.vocab_size, 6, seed=9)
    sp = [
        SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i)
        for i in range(6)
    ]
    batched = [o.token_ids for o in engine.generate(prompts, sp)]
    alone = [engine.generate([p], s)[0].token_ids for p, s in zip(prompts, sp)]
    assert batched == alone
    other_seed = engine.generate(
        [prompts[0]], SamplingParams(max_tokens=10, temperature=0.9, seed=1)
    )[0]
    assert other_seed.token_ids != batched[0]


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_model, alone):
    prompts, expected = alone
    engine = _engine(tiny_model)
    for sp in (
        SamplingParams(max_tokens=12, temperature=1.5, top_k=1, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, ignore_eos=True),
    ):
        assert [o.token_ids for o in engine.generate(prompts[:4], sp)] == expected[:4]


def test_logprobs(tiny_model):
    engine = _engine(tiny_model)
    out = engine.generate(
        ["Hello"], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True)
    )[0]
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == tok  # greedy: the best token is the chosen one
        assert lp.top[0][1] == pytest.approx(lp.logprob)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"logprobs": 99}, "logprobs"),
        ({"stop_token_ids": (10**9,)}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params_are_rejected_by_name(tiny_model, kwargs, needle):
    engine = _engine(tiny_model)
    with pytest.raises(ValueError, match=needle):
        engine.add_request([5, 6], SamplingParams(**kwargs))


def test_bad_prompts_are_rejected(tiny_model):
    engine = _engine(tiny_model, max_model_len=64)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([5, engine.vocab_size], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="context limit"):
        engine.add_request(list(range(4, 68)), GREEDY)
    assert not engine.has_unfinished()


def test_max_tokens_past_the_context_is_rejected_up_front(tiny_model):
    engine = _engine(tiny_model, max_model_len=40)
    prompt = list(range(4, 34))  # 30 tokens
    with pytest.raises(ValueError, match="max_tokens 11 plus the prompt's 30 tokens"):
        engine.add_request(prompt, SamplingParams(max_tokens=11))
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    out = engine.generate([prompt], sp)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_greedy_is_deterministic_across_engines(tiny_model, alone):
    prompts, expected = alone
    torch.manual_seed(1234)  # global RNG state must not matter
    assert [o.token_ids for o in _engine(tiny_model).generate(prompts, GREEDY)] == expected


def test_prefix_cache_gives_the_tokens_of_computing_everything(tiny_model):
    """float64, so the two paths must agree exactly: a shared system prompt, then a second turn
    that repeats the first turn's prompt and answer, with the cache on and off."""

    def engine(prefix_caching: bool) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=tiny_model,
                dtype="float64",
                cache=CacheConfig(block_size=16, num_blocks=64, prefix_caching=prefix_caching),
                scheduler=SchedulerConfig(max_num_batched_tokens=40),
            )
        )

    on, off = engine(True), engine(False)
    rng = random.Random(3)
    system = [rng.randrange(4, on.vocab_size) for _ in range(37)]
    firsts = [system + [rng.randrange(4, on.vocab_size) for _ in range(9)] for _ in range(3)]
    got = {}
    for name, eng in (("on", on), ("off", off)):
        turn1 = [o.token_ids for o in eng.generate(firsts, GREEDY)]
        turn2 = [p + t + [11, 12, 13] for p, t in zip(firsts, turn1)]
        got[name] = (turn1, [o.token_ids for o in eng.generate(turn2, GREEDY)])
        assert eng.blocks.num_used == 0
    assert got["on"] == got["off"]
    sched = on.scheduler
    # turn 2 finds each conversation's turn 1 (its prompt and all but its last answer token)
    assert sched.num_prefix_hit_tokens >= 3 * 48
    assert off.scheduler.num_prefix_hit_tokens == 0 and off.blocks.num_cached == 0


def test_a_long_gpt_oss_sequence_holds_its_full_blocks_and_one_window(gpt_oss_model):
    """Sliding layers share cache slots with full ones and keep only their window's blocks
    (the tokens: tests/cluster/test_gpt_oss_matches_transformers.py)."""
    eng = LLMEngine(
        EngineConfig(
            model=gpt_oss_model,
            dtype="float32",
            cache=CacheConfig(block_size=4, num_blocks=64),
            scheduler=SchedulerConfig(max_num_batched_tokens=16),
        )
    )
    assert eng.runner.kv_caches.shape[:2] == (2, 65)  # 4 layers in 2 slots; the spare block
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    rid = eng.add_request(list(range(4, 44)), sp)  # 40 tokens; the window is 6
    held = []
    while eng.has_unfinished():
        eng.step()
        r = eng.scheduler.requests.get(rid)
        if r is not None:
            live = len(r.window_block_ids) - r.window_start_block
            assert eng.blocks.num_used == len(r.block_ids) + live
            held.append((len(r.block_ids), live))
    assert held[-1] == (17, 2)  # 68 tokens in 17 blocks before the last step; the window in 2
    assert max(live for _, live in held) <= eng.groups.peak_window_blocks(16, 4)
    assert eng.blocks.num_used == 0


def test_the_engine_imports_without_ray():
    """The single-process engine and its benches need no Ray (the GPU machines' benches carry
    none): only the cluster's serving parts import it, where they use it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # any import of ray now fails\n"
        "import pdserve.cluster, pdserve.cluster.kv_transport, pdserve.bench.decode_step\n"
        "import pdserve.bench.mixed_step, pdserve.bench.kernels\n"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True)
