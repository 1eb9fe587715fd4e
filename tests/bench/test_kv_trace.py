"""bench.kv_trace: the hand-off records of four writers lined up on the decode replica's clock."""

from __future__ import annotations

import json

import pytest

from pdserve.bench import kv_trace


def _write(folder, pid: int, records: list[tuple[str, str, dict]]) -> None:
    with open(folder / f"{pid}.jsonl", "a") as f:
        for side, tid, t in records:
            f.write(json.dumps({"side": side, "tid": tid, "t": t}) + "\n")


def _transfer(folder, tid: str, called: float, kv_late_s: float) -> None:
    """One transfer's four records, as two processes per side would write them."""
    answered = called + 0.1
    _write(folder, 1, [("decode replica", tid, {"called": called, "answered": answered,
                                                "landed": answered + kv_late_s})])  # fmt: skip
    _write(folder, 2, [("prefill replica", tid, {"arrived": called + 0.001,
                                                 "replied": answered - 0.0005})])  # fmt: skip
    _write(folder, 2, [("prefill peer", tid, {"staged": answered - 0.03,
                                              "sent": answered + 0.001})])  # fmt: skip
    _write(folder, 1, [("decode peer", tid, {"received": answered + kv_late_s - 0.0002})])


def test_phases_are_ms_from_the_result_and_summarised_by_median(tmp_path):
    for i, late in enumerate([0.001, 0.002, 0.030]):
        _transfer(tmp_path, f"r{i}/1", called=10.0 + i, kv_late_s=late)
    # a transfer the decode replica never finished (no record of its own) is left out
    _write(tmp_path, 2, [("prefill peer", "lost/1", {"staged": 1.0, "sent": 1.1})])
    rows = kv_trace.timelines(kv_trace.load(tmp_path))
    assert len(rows) == 3
    assert rows[0]["decode replica: answered"] == 0.0
    assert rows[0]["prefill peer: staged"] == pytest.approx(-30.0)
    assert [r["decode replica: landed"] for r in rows] == pytest.approx([1.0, 2.0, 30.0])
    table = {r["phase"]: r for r in kv_trace.summary(rows)}
    landed = table["decode replica: landed"]
    assert landed["median_ms"] == pytest.approx(2.0)
    assert landed["mean_ms"] == pytest.approx(11.0)
    assert landed["p90_ms"] == pytest.approx(30.0) and landed["count"] == 3
    ordered = [r["phase"] for r in kv_trace.summary(rows)]
    assert ordered.index("prefill peer: staged") < ordered.index("decode replica: answered")


def test_skip_leaves_out_the_first_transfers_by_call_time(tmp_path):
    _transfer(tmp_path, "late/1", called=20.0, kv_late_s=0.005)
    _transfer(tmp_path, "early/1", called=5.0, kv_late_s=0.050)
    rows = kv_trace.timelines(kv_trace.load(tmp_path), skip=1)
    assert [r["decode replica: landed"] for r in rows] == pytest.approx([5.0])


def test_main_prints_the_table_and_writes_json(tmp_path, capsys):
    _transfer(tmp_path, "a/1", called=1.0, kv_late_s=0.004)
    out = tmp_path / "out" / "kv-trace.json"
    assert kv_trace.main([str(tmp_path), "--out", str(out)]) == 0
    assert "decode replica: landed" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["transfers"][0]["decode replica: landed"] == pytest.approx(4.0)


def test_main_says_so_when_no_transfer_is_complete(tmp_path, capsys):
    _write(tmp_path, 2, [("prefill peer", "x/1", {"sent": 1.0})])
    assert kv_trace.main([str(tmp_path)]) == 1
    assert "no transfer" in capsys.readouterr().out


def test_gc_pauses_are_listed_and_marked_when_they_overlap_a_transfer(tmp_path, capsys):
    _transfer(tmp_path, "a/1", called=10.0, kv_late_s=0.004)  # decode side: 10.0 to 10.104
    _write(tmp_path, 1, [("gc", "gc2/1/10.05", {"start": 10.05, "stop": 10.07}),
                         ("gc", "gc0/2/20.0", {"start": 20.0, "stop": 20.0015})])  # fmt: skip
    pauses = kv_trace.gc_pauses(kv_trace.load(tmp_path))
    assert [(g["pid"], g["generation"], g["in_transfer"]) for g in pauses] == [
        (1, 2, True),
        (2, 0, False),
    ]
    assert pauses[0]["ms"] == pytest.approx(20.0)
    out = tmp_path / "kv-trace.json"
    assert kv_trace.main([str(tmp_path), "--out", str(out)]) == 0
    assert "2 garbage collections" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["gc_pauses"]) == 2
