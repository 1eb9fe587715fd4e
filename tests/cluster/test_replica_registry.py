from __future__ import annotations

import time

from pdserve.cluster.replica_registry import STALE_S, RegistryState, render_prometheus
from pdserve.cluster.replica_stats import Histogram, ReplicaStats


def _stats(rid: str, pool: str, gen: str, **kw) -> ReplicaStats:
    return ReplicaStats(pool=pool, replica_id=rid, generation=gen, heartbeat=time.time(), **kw)


def test_stale_and_older_generation_replicas_are_dropped():
    reg = RegistryState()
    reg.report(_stats("d1", "decode", "g1"))
    reg.report(_stats("p1", "prefill", "g1"))
    old = _stats("d0", "decode", "g1")
    old.heartbeat -= STALE_S + 1
    reg.report(old)
    assert {s.replica_id for s in reg.snapshot()} == {"d1", "p1"}
    reg.set_app_args({"prefill": None}, "g2")  # redeployed as colocated
    reg.report(_stats("d2", "decode", "g2"))
    assert [s.replica_id for s in reg.snapshot()] == ["d2"]
    reg.leave("d2")
    assert reg.snapshot() == [] and reg.app_args() == {"prefill": None}


def test_prometheus_sums_pools_and_cumulates_buckets():
    a = _stats(
        "d1", "decode", "g", kv_blocks_used=3, kv_blocks_total=10, kv_blocks_parked=2,
        requests={"ok": 2},
    )  # fmt: skip
    b = _stats(
        "d2", "decode", "g", kv_blocks_used=1, kv_blocks_total=10, requests={"ok": 1, "error": 1}
    )
    a.ttft.observe(0.003)
    b.ttft.observe(0.2)
    b.ttft.observe(100.0)
    text = render_prometheus([a, b, _stats("p1", "prefill", "g")])
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines['pdserve_replicas{pool="decode"}'] == "2"
    assert lines['pdserve_kv_blocks_used{pool="decode"}'] == "4"
    assert lines['pdserve_kv_blocks_free{pool="decode"}'] == "16"
    assert lines['pdserve_kv_blocks_parked{pool="decode"}'] == "2"
    assert lines['pdserve_requests_total{pool="decode",outcome="ok"}'] == "3"
    assert lines['pdserve_requests_total{pool="decode",outcome="error"}'] == "1"
    assert lines['pdserve_time_to_first_token_seconds_bucket{pool="decode",le="0.005"}'] == "1"
    assert lines['pdserve_time_to_first_token_seconds_bucket{pool="decode",le="0.25"}'] == "2"
    assert lines['pdserve_time_to_first_token_seconds_bucket{pool="decode",le="+Inf"}'] == "3"
    assert lines['pdserve_time_to_first_token_seconds_count{pool="decode"}'] == "3"
    assert lines['pdserve_kv_blocks_used{pool="prefill"}'] == "0"
    assert Histogram().bounds == a.ttft.bounds
    assert "handoff_seconds_count" not in text.replace("# ", "")  # no phase observed yet


def test_prometheus_handoff_phases_sum_over_the_pool():
    a, b = _stats("d1", "decode", "g"), _stats("d2", "decode", "g")
    a.observe_handoff("join", 0.004)
    b.observe_handoff("join", 0.002)
    b.observe_handoff("prefill_call", 0.3)
    text = render_prometheus([a, b])
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines['pdserve_handoff_seconds_count{pool="decode",phase="join"}'] == "2"
    assert lines['pdserve_handoff_seconds_sum{pool="decode",phase="join"}'] == "0.006"
    assert lines['pdserve_handoff_seconds_bucket{pool="decode",phase="join",le="0.0025"}'] == "1"
    assert lines['pdserve_handoff_seconds_count{pool="decode",phase="prefill_call"}'] == "1"
    assert 'phase="kv_after_result"' not in text
