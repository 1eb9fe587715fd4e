"""The decode-step bench runs end to end on CPU (the padded graph path uncaptured, and plain)."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.decode_step import main
from pdserve.bench.step_profile import one_layer, split_kernel_time


def test_decode_step_bench_writes_a_row_per_batch_and_mode(tiny_model, tmp_path):
    out = tmp_path / "d.json"
    args = ["--model", tiny_model, "--device", "cpu", "--batches", "1,3", "--steps", "3"]
    args += ["--context", "20", "--modes", "eager,off", "--prefill-lens", "40", "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    for mode in ("graphs_eager", "graphs_off"):
        assert [r["batch"] for r in result[mode]] == [1, 3]
        assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in result[mode])
        assert all(r["overlap_ms"] > 0 and r["ahead_ms"] > 0 for r in result[mode])
    # steps planned ahead follow steps on the graph path alone; all but the first timed one
    assert [r["ahead_share"] for r in result["graphs_eager"]] == [2 / 3] * 2
    assert [r["ahead_share"] for r in result["graphs_off"]] == [0.0] * 2
    assert result["prefill"][0]["tokens"] == 40 and result["prefill"][0]["ms"] > 0
    assert result["prefill"][0]["TFLOPs"] > 0 and result["prefill"][0]["pct_matmul"] > 0
    assert result["ceilings"]["copy_GBps"] > 0 and result["ceilings"]["matmul_TFLOPs"] > 0
    for r in result["graphs_off"]:  # every step against its floor
        assert r["floor_ms"] > 0 and r["step_over_floor"] == r["step_ms"] / r["floor_ms"]
        assert len(r["experts_hit"]) == 2  # the tiny model's two MoE layers


def test_requests_outlast_the_three_timed_orders(tiny_model, tmp_path):
    """Each request decodes through the step, overlap and ahead timings of --steps each."""
    out = tmp_path / "s.json"
    args = ["--model", tiny_model, "--device", "cpu", "--batches", "1", "--steps", "40"]
    args += ["--context", "8", "--modes", "eager", "--out", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["graphs_eager"][0]["ahead_share"] == 39 / 40


def test_requests_outlast_a_long_fill(tiny_model, tmp_path):
    """40 prompts of 60 tokens through steps of 64 tokens: about 80 steps of prefill, during
    which the first requests decode a token a step; none may finish before the timed steps."""
    out = tmp_path / "f.json"
    args = ["--model", tiny_model, "--device", "cpu", "--batches", "40", "--steps", "2"]
    args += ["--context", "60", "--step-tokens", "64", "--modes", "off", "--out", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["graphs_off"][0]["batch"] == 40


def test_kernel_overrides_reach_the_engine(tiny_model, tmp_path):
    out = tmp_path / "k.json"
    args = ["--model", tiny_model, "--device", "cpu", "--batches", "1", "--steps", "2"]
    args += ["--context", "8", "--modes", "off", "--kernels", "rope=torch", "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["kernel_overrides"] == {"rope": "torch"} and result["kernels"]["rope"] == "torch"
    with pytest.raises(SystemExit):
        main(["--model", tiny_model, "--kernels", "rope"])


def test_mla_triton_rows_sets_the_split_for_every_head_count(
    tiny_model, tmp_path, monkeypatch, capsys
):
    """--mla-triton-rows N: FlashInfer's MLA decode hands up to N decode rows to the Triton
    kernel at any head count (this process's engines), recorded in the result; refused under
    tensor parallelism, whose ranks are other processes."""
    from pdserve.kernels import mla_decode_flashinfer as fi

    monkeypatch.setattr(fi, "TRITON_ROWS", dict(fi.TRITON_ROWS))
    out = tmp_path / "r.json"
    args = ["--model", tiny_model, "--device", "cpu", "--batches", "1", "--steps", "2"]
    args += ["--context", "8", "--modes", "off", "--mla-triton-rows", "0", "--out", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["mla_triton_rows"] == {str(1 << 20): 0}
    assert [fi.triton_rows(h) for h in (16, 128, 1024)] == [0, 0, 0]
    main(args[:-4] + ["--mla-triton-rows", "64", "--out", str(out)])
    assert [fi.triton_rows(h) for h in (16, 128, 1024)] == [64, 64, 64]
    with pytest.raises(SystemExit):
        main(["--model", tiny_model, "--tp", "2", "--mla-triton-rows", "4"])
    assert "--mla-triton-rows sets this process's table: use --tp 1" in capsys.readouterr().err


def test_a_profile_without_eager_steps_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "/nonexistent", "--modes", "auto", "--profile"])
    assert "add off to --modes (got 'auto')" in capsys.readouterr().err


def test_kernel_time_goes_to_the_innermost_range_that_holds_its_start():
    spans = [(0, 100, "attention"), (80, 95, "all_reduce"), (100, 200, "moe")]
    kernels = [(1, 11, "mla"), (85, 90, "nccl"), (100, 130, "gemm"), (150, 160, "gemm"),
               (200, 204, "argmax"), (300, 301, "copy")]  # fmt: skip
    parts = split_kernel_time(spans, kernels)
    assert parts == {"attention": 10, "all_reduce": 5, "moe": 40, "rest": 5}


def test_one_layer_is_the_middle_attention_span_and_the_moe_after_it():
    spans = [(0, 10, "attention"), (10, 20, "moe"), (20, 30, "attention"), (30, 40, "moe"),
             (40, 50, "attention"), (50, 60, "moe")]  # fmt: skip
    kernels = [(k, k + 1.04, f"k{k}") for k in range(0, 60, 5)]
    assert one_layer(spans, kernels) == [("k20", 1.0), ("k25", 1.0), ("k30", 1.0), ("k35", 1.0)]
    assert one_layer([], kernels) == []
