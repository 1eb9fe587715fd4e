"""The FP8 GEMM bench runs on CPU (the kernel under Triton's interpreter, small shapes, no
timing): a row per M, each checked against the PyTorch reference."""

from __future__ import annotations

import json

from pdserve.bench.fp8_gemm import main


def test_fp8_gemm_bench_checks_each_row_against_the_reference(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert main(["--device", "cpu", "--m", "1,17", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["M"], r["N"], r["K"]) for r in rows] == [(1, 200, 384), (17, 200, 384)]
    assert all(r["triton_rel_err"] < 1e-5 for r in rows)
    assert "scaled_mm_rel_err" not in rows[0]  # cuBLAS: GPUs only
    assert "triton ms" in capsys.readouterr().out
