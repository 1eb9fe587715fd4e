"""The prefill-path bench runs end to end on CPU: the same prompts in process and in a rank
actor, a row per prompt length."""

from __future__ import annotations

import json

from pdserve.bench.prefill_path import main


def test_prefill_path_bench_times_both_ways_per_length(tiny_model, tmp_path):
    out = tmp_path / "p.json"
    args = ["--model", tiny_model, "--device", "cpu", "--tokens", "16,40", "--iters", "2"]
    assert main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [16, 40]
    for r in rows:
        assert r["in_process_ms"] > 0 and r["rank_actor_ms"] > 0
        assert r["difference_ms"] == r["rank_actor_ms"] - r["in_process_ms"]
