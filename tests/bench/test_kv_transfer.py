"""bench.kv_transfer runs end to end (gloo on CPU here; NCCL between GPUs) and checks that every
transfer's blocks arrived intact."""

from __future__ import annotations

import json

from pdserve.bench import kv_transfer


def test_kv_transfer_bench_smoke(tmp_path):
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        out = tmp_path / "kv.json"
        argv = "--device cpu --tokens 64,300 --iters 1 --layers 2 --width 80 --block-size 16"
        argv = [*argv.split(), "--dtype", "float32", "--out", str(out)]
        assert kv_transfer.main(argv) == 0
    finally:
        if started:
            ray.shutdown()
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [64, 300]
    assert rows[1]["bytes"] == 2 * 19 * 16 * 80 * 4  # 300 tokens fill 19 blocks of 16
    assert all(r["raw_s"] > 0 and r["early_s"] > 0 and r["after_s"] > 0 for r in rows)
    assert all(r["early_pct_of_raw"] > 0 and r["after_pct_of_raw"] > 0 for r in rows)
