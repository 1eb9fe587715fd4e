"""The rank actors' calls: a rank that fails does not leave the caller waiting on the others."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_a_failing_rank_ends_the_wait_and_stops_the_group(ray_local):
    """Rank 1 fails while rank 0 waits in a collective that would never end: the caller hears
    of rank 1 at once, and the group is stopped."""
    from pdserve.cluster.tp_executor import gather_ranks

    ray = ray_local

    @ray.remote
    class Rank:
        def run(self, fail: bool) -> int:
            if fail:
                raise MemoryError("out of memory in a warm-up step")
            time.sleep(600)  # a collective whose peer is gone
            return 0

    ranks = [Rank.remote(), Rank.remote()]
    stopped = []

    def stop() -> None:
        stopped.append(True)
        for r in ranks:
            ray.kill(r)

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 failed while warming up.*MemoryError"):
        gather_ranks([r.run.remote(i == 1) for i, r in enumerate(ranks)], "warming up", stop)
    assert stopped and time.monotonic() - start < 60


def test_results_come_back_in_rank_order(ray_local):
    from pdserve.cluster.tp_executor import gather_ranks

    ray = ray_local

    @ray.remote
    def echo(v: int, delay: float) -> int:
        time.sleep(delay)
        return v

    refs = [echo.remote(0, 0.5), echo.remote(1, 0.0)]  # rank 1 answers first
    assert gather_ranks(refs, "echoing", lambda: pytest.fail("nothing failed")) == [0, 1]
    # slower than the poll: rank 1's answer is checked while rank 0 still runs
    refs = [echo.remote(0, 1.0), echo.remote(1, 0.0)]
    assert gather_ranks(refs, "echoing", lambda: pytest.fail("nothing failed"), 0.1) == [0, 1]


def test_a_rank_failing_after_the_others_answered_is_named(ray_local):
    """Every rank answers, one with an error: it is named, and the group stopped."""
    from pdserve.cluster.tp_executor import gather_ranks

    ray = ray_local

    @ray.remote
    def step(fail: bool) -> int:
        if fail:
            raise ValueError("bad step")
        return 0

    stopped = []
    with pytest.raises(RuntimeError, match=r"rank 0 failed while running a step.*ValueError"):
        gather_ranks([step.remote(True), step.remote(False)], "running a step",
                     lambda: stopped.append(True))  # fmt: skip
    assert stopped
    # a step's refs: every rank's launch, then rank 0's collect, which a failure names
    refs = [step.remote(False), step.remote(False), step.remote(True)]
    with pytest.raises(RuntimeError, match="rank 0 failed while running a step"):
        gather_ranks(refs, "running a step", lambda: None, ranks=[0, 1, 0])


def test_a_rank_lost_mid_step_stops_the_group_instead_of_hanging(ray_local, tiny_model):
    """TP=2 on CPU (gloo): rank 1 is killed, then a step runs. Under NCCL rank 0 would wait in
    the step's first all-reduce forever (gloo sees the peer's socket close and fails it): collect
    names the first rank it hears of within seconds, the group is stopped, and every later step
    is refused with the reason (a replica's health check raises it, so Serve replaces the
    replica)."""
    from pdserve.cluster import CacheConfig, EngineConfig, ModelConfig
    from pdserve.cluster.sampling_params import SamplingParams
    from pdserve.cluster.scheduler import ScheduledChunk, SchedulerOutput
    from pdserve.cluster.tp_executor import RayTPExecutor

    ray = ray_local
    cfg = EngineConfig(model=tiny_model, device="cpu", tp=2, rank_actors=True,
                       cache=CacheConfig(block_size=16, num_blocks=8))  # fmt: skip
    executor = RayTPExecutor(cfg, ModelConfig.from_dir(tiny_model), 512)
    chunk = ScheduledChunk("r", (5, 6, 7), 0, (0,), True, SamplingParams(max_tokens=1), 0)
    step = SchedulerOutput((chunk,))
    assert len(executor.execute(step)) == 1  # the group works
    ray.kill(executor.ranks[1])
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank [01] failed while running a step"):
        executor.execute(step)
    assert time.monotonic() - start < 60
    assert executor.stopped and not executor.ranks
    with pytest.raises(RuntimeError, match="tensor-parallel group was stopped"):
        executor.launch(step)


def test_steps_planned_ahead_over_two_ranks_give_one_process_outputs(ray_local, tiny_model):
    """TP=2 over gloo with decode steps on the graph path (uncaptured): each rank queues a step
    planned ahead before the step before it is collected, rank 0 feeding the group its sampled
    ids. Greedy, seeded, stop-token and length ends as one process planning after the tokens."""
    from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SchedulerConfig
    from tests.cluster.test_engine_ahead import _counting, _workload

    base = dict(
        model=tiny_model, device="cpu", dtype="float64", decode_graphs="eager",
        decode_graph_max_batch=8, cache=CacheConfig(block_size=4, num_blocks=48),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
    )  # fmt: skip
    one = LLMEngine(EngineConfig(**base, plan_ahead=False))
    prompts, params = _workload(one)
    want = one.generate(prompts, params)
    tp2 = LLMEngine(EngineConfig(**base, tp=2))
    try:
        rows = _counting(tp2)
        got = tp2.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
        assert len(rows) >= 5 and tp2.blocks.num_used == tp2.blocks.num_parked == 0
    finally:
        tp2.runner.shutdown()


def test_a_rank_lost_before_a_wait_for_the_steps_stops_the_group(ray_local, tiny_model):
    """A failed step makes the engine wait for every rank (``synchronize``): a rank found dead
    there stops the group as a failed collect does, so later steps are refused with why."""
    from pdserve.cluster import CacheConfig, EngineConfig, ModelConfig
    from pdserve.cluster.scheduler import SchedulerOutput
    from pdserve.cluster.tp_executor import RayTPExecutor

    ray = ray_local
    cfg = EngineConfig(model=tiny_model, device="cpu", tp=2, rank_actors=True,
                       cache=CacheConfig(block_size=16, num_blocks=8))  # fmt: skip
    executor = RayTPExecutor(cfg, ModelConfig.from_dir(tiny_model), 512)
    executor.synchronize()  # nothing in flight: every rank answers
    dead = executor.ranks[1]
    ray.kill(dead)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # a kill lands a little later: wait until it has
        try:
            ray.get(dead.pid.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.1)
    with pytest.raises(RuntimeError, match="rank 1 failed while waiting for its steps"):
        executor.synchronize()
    assert executor.stopped and not executor.ranks
    with pytest.raises(RuntimeError, match="tensor-parallel group was stopped"):
        executor.launch(SchedulerOutput(()))


def test_ranks_that_would_share_one_gpu_are_refused_by_name():
    from pdserve.cluster.config import EngineConfig
    from pdserve.cluster.tp_executor import shared_gpu

    why = shared_gpu(EngineConfig(model="m", device="cuda", tp=2))
    assert why and "tp=2 ranks with gpus_per_rank=0 on device 'cuda'" in why
    assert shared_gpu(EngineConfig(model="m", device="cuda", tp=2, gpus_per_rank=1)) is None
    assert shared_gpu(EngineConfig(model="m", device="cpu", tp=2)) is None
    assert shared_gpu(EngineConfig(model="m", device="cuda", tp=1)) is None
