"""The mixed-step bench runs end to end on CPU: each row's step is the planned mix."""

from __future__ import annotations

import json

import pytest

from pdserve.bench import mixed_step
from pdserve.bench.mixed_step import main
from tests.cluster.test_decode_graphs import planning_stand_in


@pytest.mark.parametrize("which", ["tiny_model", "gpt_oss_model"])
def test_mixed_step_bench_times_each_batch_and_chunk(which, request, tmp_path):
    out = tmp_path / "m.json"
    args = [
        "--model",
        request.getfixturevalue(which),
        "--device",
        "cpu",
        "--batches",
        "0,2",
        "--chunks",
        "8,24",
    ]
    args += ["--context", "12", "--reps", "2", "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert [(r["batch"], r["chunk"]) for r in result["rows"]] == [(0, 8), (0, 24), (2, 8), (2, 24)]
    for r in result["rows"]:
        assert r["eager_ms"] > 0 and r["step_ms"] > 0
        assert r["replay_ms"] is None and r["not_captured"] == "no CUDA device"


def test_mixed_step_bench_rejects_a_chunk_of_one_token(tiny_model, tmp_path):
    with pytest.raises(SystemExit):
        main(["--model", tiny_model, "--device", "cpu", "--chunks", "1", "--out", str(tmp_path)])


def test_an_mla_decode_that_plans_on_the_host_is_planned_for_the_benchs_forwards(
    tiny_model, tmp_path, monkeypatch
):
    """The bench's own eager forwards and capture of a step run on that step's plan (as
    FlashInfer's MLA decode needs), not on the step before's: a planning stand-in checks every
    call's decode rows against the last plan."""
    made, calls = mixed_step._engine, []

    def engine(*args, **kw):
        e = made(*args, **kw)
        calls.append(planning_stand_in(e.runner)[1])
        return e

    monkeypatch.setattr(mixed_step, "_engine", engine)
    args = ["--model", tiny_model, "--device", "cpu", "--batches", "2", "--chunks", "8,24"]
    assert main([*args, "--context", "12", "--reps", "2", "--out", str(tmp_path / "m.json")]) == 0
    assert [n for n, _ in calls[0]].count(2) >= 2 * 3  # both rows' eager forwards and steps
