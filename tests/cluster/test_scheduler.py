"""The scheduler on integers alone: budgets, chunking, decode-first order, preemption, abort."""

from __future__ import annotations

import random

import pytest

from pdserve.cluster.block_hash import extend_block_hashes
from pdserve.cluster.block_manager import BlockManager
from pdserve.cluster.config import SchedulerConfig
from pdserve.cluster.kv_groups import KVGroups
from pdserve.cluster.request import FinishReason, Request, RequestStatus
from pdserve.cluster.sampling_params import SamplingParams
from pdserve.cluster.scheduler import FED, Scheduler

SP = SamplingParams(max_tokens=100)


def _sched(num_blocks=64, block_size=4, prefix_caching=True, **kw) -> Scheduler:
    cfg = SchedulerConfig(**{"max_num_batched_tokens": 16, "max_num_seqs": 8, **kw})
    blocks = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(cfg, blocks, max_model_len=1000)


def _req(rid: str, n: int) -> Request:
    return Request(rid, list(range(n)), SP)


def _sample(s: Scheduler, out, token: int = 7) -> None:
    """What the engine does after a step: mark its KV written, append a token to every sampled
    request."""
    s.written(out, [s.requests[c.request_id] for c in out.chunks])
    for c in out.chunks:
        if c.sample:
            s.requests[c.request_id].output_token_ids.append(token)


def test_long_prompt_is_chunked_under_the_budget():
    s = _sched()
    s.add(_req("a", 40))
    starts = []
    while True:
        out = s.schedule()
        (c,) = out.chunks
        starts.append((c.start, len(c.token_ids), c.sample))
        _sample(s, out)
        if c.sample:
            break
    assert starts == [(0, 16, False), (16, 16, False), (32, 8, True)]
    req = s.requests["a"]
    assert len(req.block_ids) == 10  # 40 tokens in blocks of 4


def test_decodes_come_first_and_prompts_share_what_is_left():
    s = _sched()
    s.add(_req("a", 3))
    _sample(s, s.schedule())  # a prefilled, sampled its first token
    s.add(_req("b", 30))
    out = s.schedule()
    assert [(c.request_id, len(c.token_ids)) for c in out.chunks] == [("a", 1), ("b", 15)]
    assert out.chunks[0].start == 3 and out.chunks[0].token_ids == (7,)


def test_long_prefill_threshold_lets_prompts_share_a_step():
    s = _sched(long_prefill_token_threshold=5)
    for i in range(3):
        s.add(_req(f"r{i}", 20))
    out = s.schedule()
    assert [len(c.token_ids) for c in out.chunks] == [5, 5, 5]


def test_max_num_seqs_limits_admission():
    s = _sched(max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(4):
        s.add(_req(f"r{i}", 3))
    out = s.schedule()
    assert {c.request_id for c in out.chunks} == {"r0", "r1"}
    assert len(s.waiting) == 2


def test_preemption_frees_the_newest_and_requeues_it_first():
    s = _sched(num_blocks=6, block_size=4, max_num_batched_tokens=64, prefix_caching=False)
    s.add(_req("old", 8))
    s.add(_req("new", 12))
    _sample(s, s.schedule())  # 2 + 3 blocks used, 1 free
    assert s.blocks.num_free == 1
    for _ in range(4):  # old's decodes grow into the free block, then need another
        _sample(s, s.schedule())
    assert s.num_preemptions >= 1
    new = s.requests["new"]
    assert (
        new.status == RequestStatus.WAITING and new.block_ids == [] and new.num_computed_tokens == 0
    )
    assert s.waiting[0] is new
    # once old finishes, new recomputes prompt + its tokens and continues
    s.finish(s.requests["old"], FinishReason.LENGTH)
    out = s.schedule()
    (c,) = out.chunks
    assert c.request_id == "new" and c.start == 0 and c.end == new.num_tokens and c.sample


def test_a_step_never_preempts_a_request_it_already_scheduled():
    rng = random.Random(0)
    s = _sched(num_blocks=12, block_size=2, max_num_batched_tokens=12, max_num_seqs=6)
    n = 0
    for _ in range(300):
        if rng.random() < 0.3:
            s.add(_req(f"r{n}", rng.randint(1, 9)))
            n += 1
        out = s.schedule()
        scheduled = [c.request_id for c in out.chunks]
        assert not set(scheduled) & set(out.preempted)
        for c in out.chunks:
            req = s.requests[c.request_id]
            assert req.status == RequestStatus.RUNNING
            assert len(req.block_ids) * 2 >= c.end  # the table covers the chunk
        _sample(s, out)
        for rid in scheduled:
            req = s.requests.get(rid)
            if req is not None and len(req.output_token_ids) >= 4:
                s.finish(req, FinishReason.LENGTH)
        held = [b for r in s.running for b in r.block_ids]  # prefixes shared: a block twice
        assert len(set(held)) == s.blocks.num_used
        assert all(s.blocks._ref[b] == held.count(b) for b in set(held))
    for rid in list(s.requests):
        s.abort(rid)
    assert s.blocks.num_used == 0


def test_abort_waiting_and_running():
    s = _sched(max_num_seqs=1)
    s.add(_req("a", 5))
    s.add(_req("b", 5))
    s.schedule()
    assert s.abort("b").finish_reason == FinishReason.ABORT  # still waiting
    assert s.abort("a").status == RequestStatus.FINISHED  # running
    assert s.abort("a") is None
    assert s.blocks.num_used == 0 and not s.has_unfinished()


def test_duplicate_request_id_is_rejected():
    s = _sched()
    s.add(_req("a", 2))
    with pytest.raises(ValueError, match="already in use"):
        s.add(_req("a", 2))


def test_block_manager_counts_and_refuses():
    bm = BlockManager(4, 16)
    assert bm.blocks_for(0) == 0 and bm.blocks_for(16) == 1 and bm.blocks_for(17) == 2
    a = bm.allocate(3)
    assert bm.num_free == 1 and len(set(a)) == 3
    with pytest.raises(RuntimeError, match="2 KV blocks with 1 free"):
        bm.allocate(2)
    bm.share(a[:1])
    bm.free(a)
    assert bm.num_free == 3  # a[0] still has a reference
    bm.free(a[:1])
    assert bm.num_free == 4
    with pytest.raises(AssertionError, match="double free"):
        bm.free(a[:1])
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def _finish_after_prefill(s: Scheduler, rid: str) -> None:
    while True:
        out = s.schedule()
        _sample(s, out)
        if any(c.request_id == rid and c.sample for c in out.chunks):
            s.finish(s.requests[rid], FinishReason.LENGTH)
            return


def test_a_shared_prefix_is_not_computed_again():
    s = _sched(num_blocks=16, block_size=4)
    s.add(Request("a", list(range(10)), SP))  # two full blocks, then 2 tokens
    _finish_after_prefill(s, "a")
    assert s.blocks.num_used == 0 and s.blocks.num_cached == 2
    s.add(Request("b", list(range(8)) + [50, 51, 52], SP))
    (c,) = s.schedule().chunks
    assert (c.start, c.token_ids) == (8, (50, 51, 52)) and c.sample
    b = s.requests["b"]
    assert b.num_cached_tokens == 8 and s.num_prefix_hit_tokens == 8
    assert s.num_prefix_query_tokens == 10 + 11
    assert s.blocks.num_cached == 0  # both cached blocks are b's now


def test_a_wholly_cached_prompt_still_runs_its_last_token():
    s = _sched(num_blocks=16, block_size=4)
    s.add(Request("a", list(range(8)), SP))
    _finish_after_prefill(s, "a")
    s.add(Request("b", list(range(8)), SP))
    (c,) = s.schedule().chunks
    assert (c.start, c.token_ids, c.sample) == (4, (4, 5, 6, 7), True)  # one block left to run


def test_output_tokens_key_blocks_for_the_next_turn():
    s = _sched(num_blocks=16, block_size=4)
    s.add(Request("turn1", list(range(6)), SP))
    for _ in range(4):  # prompt, then 3 decodes: 6 + 3 tokens with KV, 4 outputs
        _sample(s, s.schedule(), token=60)
    turn1 = s.requests["turn1"]
    history = turn1.all_token_ids
    s.finish(turn1, FinishReason.STOP)
    assert s.blocks.num_cached == 2  # 9 computed tokens: two full blocks
    s.add(Request("turn2", history + [70, 71], SP))
    (c,) = s.schedule().chunks
    assert c.start == 8 and c.token_ids == tuple(history[8:] + [70, 71])


def test_a_preempted_request_resumes_from_its_cached_prefix():
    s = _sched(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    s.add(Request("old", [90 + i for i in range(8)], SP))
    s.add(Request("new", list(range(12)), SP))
    _sample(s, s.schedule())  # 2 + 3 blocks used, 1 free
    out = s.schedule()
    while "new" not in out.preempted:
        _sample(s, out)
        out = s.schedule()
    assert not [c for c in out.chunks if c.request_id == "new"]  # no re-admission in this step
    _sample(s, out)
    new = s.requests["new"]
    s.finish(s.requests["old"], FinishReason.LENGTH)
    (c,) = s.schedule().chunks
    assert c.request_id == "new" and c.start > 0 and c.end == new.num_tokens
    assert c.start == new.num_cached_tokens  # the blocks old's growth did not evict


def test_shared_prefixes_under_pressure_leak_nothing():
    rng = random.Random(1)
    s = _sched(num_blocks=10, block_size=2, max_num_batched_tokens=10, max_num_seqs=5)
    system = [5, 6, 7, 8, 9]
    n = 0
    for _ in range(400):
        if rng.random() < 0.35:
            s.add(Request(f"r{n}", system[: rng.randint(0, 5)] + [rng.randint(10, 20)], SP))
            n += 1
        if s.running and rng.random() < 0.05:
            s.abort(rng.choice(s.running).request_id)
        out = s.schedule()
        _sample(s, out)
        for c in out.chunks:
            req = s.requests.get(c.request_id)
            if req is not None and len(req.output_token_ids) >= 3:
                s.finish(req, FinishReason.LENGTH)
        held = [b for r in s.running for b in r.block_ids]
        assert len(set(held)) == s.blocks.num_used
    for rid in list(s.requests):
        s.abort(rid)
    assert s.blocks.num_used == 0 and s.blocks.num_free == 10
    assert s.num_prefix_hit_tokens > 0 and s.blocks.num_evicted > 0


def test_a_step_that_failed_keys_nothing():
    s = _sched(num_blocks=16, block_size=4)
    s.add(Request("a", list(range(10)), SP))
    s.schedule()  # the step fails: the engine never marks it written
    s.finish(s.requests["a"], FinishReason.ERROR)
    assert s.blocks.num_cached == 0
    s.add(Request("b", list(range(10)), SP))
    (c,) = s.schedule().chunks
    assert c.start == 0  # computed again, not read from blocks nobody wrote


# ---- planning ahead: the next pure decode step before the tokens of the one running ----


def _decoding(s: Scheduler, lens: list[int], max_tokens: list[int]):
    """Requests of ``lens`` prompt tokens, prefilled and sampled once, then a decode step
    planned: (that step, its launch number)."""
    for i, (n, m) in enumerate(zip(lens, max_tokens)):
        s.add(Request(f"r{i}", list(range(n)), SamplingParams(max_tokens=m)))
    _sample(s, s.schedule())
    out = s.schedule()
    assert out.num_decode_chunks == len(lens)
    return out, s.blocks.launched()


def test_the_step_ahead_decodes_the_token_being_sampled():
    s = _sched()
    prev, n = _decoding(s, [3, 4, 6], [100, 100, 100])
    ahead = s.schedule_ahead(prev, 8)
    assert ahead.feed_rows == (0, 1, 2)
    assert [(c.token_ids, c.start, c.sample) for c in ahead.chunks] == [
        ((FED,), 4, True), ((FED,), 5, True), ((FED,), 7, True)
    ]  # fmt: skip
    # r1 decodes position 5 of 4-token blocks: a second block, taken now
    assert [len(c.block_ids) for c in ahead.chunks] == [2, 2, 2]
    assert [c.num_output_tokens for c in ahead.chunks] == [2, 2, 2]
    s.blocks.landed(n)
    _sample(s, prev)  # prev's tokens come in: the requests agree with the step ahead
    assert all(r.num_uncomputed_tokens == 0 for r in s.running)


def test_a_request_the_sampled_token_ends_by_length_leaves_the_step_ahead():
    s = _sched()
    prev, _ = _decoding(s, [3, 4, 5], [100, 2, 100])
    ahead = s.schedule_ahead(prev, 8)
    assert ahead.feed_rows == (0, 2) and [c.request_id for c in ahead.chunks] == ["r0", "r2"]


def test_nothing_is_planned_ahead_that_schedule_would_plan_otherwise():
    s = _sched()
    prev, _ = _decoding(s, [3, 4], [100, 100])
    s.add(_req("late", 5))
    assert s.schedule_ahead(prev, 8) is None  # a request waits: it joins the next step
    s.abort("late")
    s.finish(s.requests["r1"], FinishReason.STOP)  # gone: its row is thrown away
    ahead = s.schedule_ahead(prev, 8)
    assert ahead.feed_rows == (0,)
    # neither from a step whose predecessor's tokens are not in, nor twice from one step
    assert s.schedule_ahead(ahead, 8) is None and s.schedule_ahead(prev, 8) is None
    # too few blocks for the step ahead: schedule would preempt, so nothing is planned
    tight = _sched(num_blocks=2)
    prev, _ = _decoding(tight, [3, 3], [100, 100])
    assert tight.blocks.num_free == 0 and tight.schedule_ahead(prev, 8) is None


def test_a_request_handed_over_meanwhile_joins_the_step_ahead_with_its_token():
    s = _sched()
    prev, _ = _decoding(s, [3, 4], [100, 100])
    adopted = Request("new", list(range(5)), SP, output_token_ids=[42])
    adopted.num_computed_tokens = adopted.num_written_tokens = 5  # its prompt's KV came over
    adopted.block_ids = s.blocks.allocate(2)
    adopted.status = RequestStatus.RUNNING
    s.add_running(adopted)
    ahead = s.schedule_ahead(prev, 8)
    assert ahead.feed_rows == (0, 1) and len(ahead.chunks) == 3
    assert ahead.chunks[2].request_id == "new" and ahead.chunks[2].token_ids == (42,)
    assert (ahead.chunks[2].start, ahead.chunks[2].sample, ahead.chunks[2].num_output_tokens) == (
        5,
        True,
        1,
    )
    # not more rows than the step ahead may hold (the decode graphs' largest batch), nor than
    # the token budget
    s2 = _sched(max_num_batched_tokens=2)
    prev, _ = _decoding(s2, [3, 3], [100, 100])
    assert s2.schedule_ahead(prev, 1) is None
    third = Request("third", [1, 2], SP, output_token_ids=[3])
    third.num_computed_tokens, third.block_ids = 2, s2.blocks.allocate(1)
    third.status = RequestStatus.RUNNING
    s2.add_running(third)
    assert s2.schedule_ahead(prev, 8) is None  # 3 decodes, a budget of 2 tokens


def test_a_step_ahead_may_feed_no_row():
    """Every request of the running step ended (a stop token) and one was handed over: the
    step ahead feeds nothing and runs the handed-over request's known token."""
    s = _sched()
    prev, _ = _decoding(s, [3], [100])
    s.finish(s.requests["r0"], FinishReason.STOP)
    adopted = Request("new", list(range(5)), SP, output_token_ids=[42])
    adopted.num_computed_tokens, adopted.block_ids = 5, s.blocks.allocate(2)
    adopted.status = RequestStatus.RUNNING
    s.add_running(adopted)
    ahead = s.schedule_ahead(prev, 8)
    assert ahead.feed_rows == () and [c.token_ids for c in ahead.chunks] == [(42,)]


def test_a_request_mid_prompt_leaves_the_next_step_to_schedule():
    """A running request that ``prev`` left out (the budget ran out) with prompt left: the next
    step carries a prefill chunk, which only ``schedule`` plans."""
    s = _sched()
    prev, _ = _decoding(s, [3], [100])
    mid = Request("mid", list(range(10)), SP)
    mid.num_computed_tokens, mid.block_ids = 4, s.blocks.allocate(1)
    mid.status = RequestStatus.RUNNING
    s.add_running(mid)
    assert s.schedule_ahead(prev, 8) is None


def test_a_request_finished_under_a_step_ahead_keeps_its_blocks_until_it_lands():
    s = _sched()
    prev, _ = _decoding(s, [3, 4], [100, 100])
    ahead = s.schedule_ahead(prev, 8)
    n = s.blocks.launched()
    free = s.blocks.num_free
    req = s.requests["r0"]
    s.finish(req, FinishReason.STOP)  # its end of sequence came with prev's tokens
    assert s.blocks.num_free == free and s.blocks.num_parked == 2
    s.blocks.landed(n)
    assert s.blocks.num_free == free + 2 and ahead.chunks[0].request_id == "r0"


# ---- sliding layers (kv_groups): a second table whose blocks before the window go back ----


def _windowed(num_blocks=64, block_size=4, window=6, prefix_caching=True, **kw) -> Scheduler:
    cfg = SchedulerConfig(**{"max_num_batched_tokens": 16, "max_num_seqs": 8, **kw})
    blocks = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(cfg, blocks, 1000, KVGroups.from_windows([window, 0]))


def _run(s: Scheduler, steps: int) -> None:
    for _ in range(steps):
        _sample(s, s.schedule())


def test_sliding_blocks_before_the_window_go_back_to_the_pool():
    s = _windowed(prefix_caching=False)
    s.add(_req("a", 40))  # 10 blocks of 4; window 6: a query reads at most 2 blocks back
    null = s.blocks.num_blocks
    for _ in range(3):  # 16-token chunks: 0-16, 16-32, 32-40 (+ the first sample)
        out = s.schedule()
        (c,) = out.chunks
        assert len(c.window_block_ids) == len(c.block_ids) == -(-c.end // 4)
        first = max(0, c.start - 5) // 4  # the chunk's first query's window starts here
        assert all(b == null for b in c.window_block_ids[:first])
        assert null not in c.window_block_ids[first:]
        _sample(s, out)
    _run(s, 20)  # decoding to 60 tokens
    r = s.requests["a"]
    assert r.num_computed_tokens == 60 and len(r.block_ids) == 15
    live = [b for b in r.window_block_ids if b != null]
    assert r.window_start_block == (60 - 5) // 4 and len(live) == 15 - r.window_start_block
    assert s.blocks.num_used == 15 + len(live)  # not 2 * 15
    assert not set(live) & set(r.block_ids)
    s.finish(r, FinishReason.STOP)
    assert s.blocks.num_used == 0


def test_sliding_tables_preempt_and_come_back_whole():
    s = _windowed(num_blocks=16, prefix_caching=False, max_num_batched_tokens=64)
    for rid in "ab":
        s.add(_req(rid, 8))  # 2 full blocks + 2 sliding ones each at first
    _run(s, 24)  # each wants 8 full + 3 sliding: one is preempted
    assert s.num_preemptions >= 1
    assert all(not r.block_ids and not r.window_block_ids for r in s.waiting)
    for r in s.running:
        assert len(r.window_block_ids) == len(r.block_ids)
        assert r.window_start_block == max(0, r.num_computed_tokens - 5) // 4
    held = sum(len(r.block_ids) + len(r.window_block_ids) - r.window_start_block for r in s.running)
    assert s.blocks.num_used == held <= 14


def test_a_prefix_hit_needs_the_sliding_blocks_of_its_window():
    s = _windowed()
    s.add(_req("a", 30))
    _run(s, 4)
    s.finish(s.requests["a"], FinishReason.STOP)  # 7 full blocks keyed, sliding 5-6 keyed
    s.add(Request("b", list(range(30)) + [99], SP))
    out = s.schedule()
    (c,) = out.chunks
    b = s.requests["b"]
    assert c.start == 28 and b.num_cached_tokens == 28  # 7 blocks: the window 23..27 cached
    assert b.window_start_block == (28 - 5) // 4
    window = b.window_block_ids[b.window_start_block : 7]
    assert s.blocks.num_blocks not in window and not set(window) & set(b.block_ids)


def test_a_prefix_hit_stops_where_a_sliding_block_of_its_window_is_gone():
    s = _windowed(num_blocks=40)
    s.add(_req("a", 30))
    _run(s, 4)  # 32 tokens: 30 prompt tokens and two sampled 7s
    s.finish(s.requests["a"], FinishReason.STOP)
    bm = s.blocks
    keys = extend_block_hashes([], list(range(30)) + [7, 7], 4, 8)
    assert bm.count_cached(keys) == 8
    # take every plain free block and evict the sliding ones (released before the full ones)
    taken = bm.allocate(bm.num_free - 8)
    assert bm.count_cached(keys) == 8 and bm.num_cached == 8
    bm.free(taken)
    s.add(Request("b", list(range(30)) + [99], SP))
    (c,) = s.schedule().chunks
    assert c.start == 0  # every full block is cached, but no window before any of them is
