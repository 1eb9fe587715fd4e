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
