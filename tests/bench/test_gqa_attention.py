"""The GQA attention bench on CPU (Triton's interpreter, tiny shapes): every backend is checked
against the reference before it is timed, and a peer that cannot run says why."""

from __future__ import annotations

import importlib.util

from pdserve.bench.gqa_attention import _eager_ms, report, run


def test_rows_hold_each_backends_time_error_or_reason(capsys):
    shape = dict(heads=4, kv_heads=2, d=16, page=16)
    rows = run([(2, 40)], "cpu", 120.0, windows=(0, 8), shape=shape,
               timer=lambda fn, q: _eager_ms(fn, q, "cpu"))  # fmt: skip
    assert [(r["B"], r["ctx"], r["window"]) for r in rows] == [(2, 40, 0), (2, 40, 8)]
    for r in rows:
        assert r["ours"]["ms"] > 0 and r["ours"]["max_err"] < 0.05  # bf16
        assert r["torch"]["max_err"] == 0
        if importlib.util.find_spec("flashinfer") is None:
            assert "ModuleNotFoundError" in r["flashinfer"]["unavailable"]
    assert rows[1]["ours"]["GBps"] < rows[0]["ours"]["GBps"] * 40  # window: fewer bytes
    report(rows, copy_gbps=10.0)
    assert "flashinfer" in capsys.readouterr().out
