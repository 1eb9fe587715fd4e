"""The handoff report reads the phases' means from the metrics text the registry renders."""

from __future__ import annotations

import time

import pytest

from pdserve.bench.handoff import means
from pdserve.cluster.replica_registry import render_prometheus
from pdserve.cluster.replica_stats import ReplicaStats


def test_means_per_phase_and_pool_from_rendered_metrics():
    a = ReplicaStats(pool="decode", replica_id="d1", heartbeat=time.time())
    b = ReplicaStats(pool="decode", replica_id="d2", heartbeat=time.time())
    a.observe_handoff("to_prefill", 0.004)
    b.observe_handoff("to_prefill", 0.002)
    b.observe_handoff("join", 0.010)
    a.ttft.observe(0.2)
    rows = {(r["metric"], r["labels"]): r for r in means(render_prometheus([a, b]))}
    to = rows[("handoff_seconds", 'pool="decode",phase="to_prefill"')]
    assert to["count"] == 2 and to["mean_ms"] == pytest.approx(3.0)
    assert rows[("handoff_seconds", 'pool="decode",phase="join"')]["mean_ms"] == pytest.approx(10)
    assert rows[("time_to_first_token_seconds", 'pool="decode"')]["mean_ms"] == pytest.approx(200)
    assert len(rows) == 3  # phases never observed, and empty histograms, are left out


def test_means_since_a_baseline_count_only_the_requests_after_it():
    a = ReplicaStats(pool="decode", replica_id="d1", heartbeat=time.time())
    a.observe_handoff("join", 1.0)  # a slow warm-up request
    baseline = render_prometheus([a])
    a.observe_handoff("join", 0.002)
    a.observe_handoff("join", 0.004)
    (row,) = means(render_prometheus([a]), baseline)
    assert row["count"] == 2 and row["mean_ms"] == pytest.approx(3.0)
