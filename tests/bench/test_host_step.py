"""The host-work bench runs end to end on CPU and times every phase of steps planned ahead."""

from __future__ import annotations

import json

from pdserve.bench.host_step import PHASES, main


def test_host_step_bench_times_each_phase_per_batch_and_context(tiny_model, tmp_path):
    out = tmp_path / "h.json"
    args = ["--model", tiny_model, "--batches", "1,4", "--contexts", "40,130", "--steps", "4"]
    assert main([*args, "--block-size", "16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 40), (4, 40), (1, 130), (4, 130)]
    for r in rows:
        assert all(r[f"{p}_ms"] > 0 for p in PHASES) and r["plan_after_ms"] > 0
        assert r["host_ms"] == sum(r[f"{p}_ms"] for p in PHASES)
