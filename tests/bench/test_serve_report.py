"""Latency, throughput and goodput math of the serving benchmark on hand-made records."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.request_record import RequestRecord
from pdserve.bench.serve_report import (
    SCHEMA,
    load_result,
    paired_table,
    paired_ttft,
    records_of,
    run_table,
    stats,
    summarize,
    sweep_table,
)


def ok_record(index: int, chunk_s: list[float], end_s: float, **kw) -> RequestRecord:
    n = kw.pop("output_tokens", len(chunk_s))
    return RequestRecord(
        index,
        kw.pop("input_len", 10),
        kw.pop("output_len", n),
        ok=True,
        status=200,
        chunk_s=chunk_s,
        chunk_tokens=kw.pop("chunk_tokens", [1] * len(chunk_s)),
        end_s=end_s,
        output_tokens=n,
        **kw,
    )


def failed_record(index: int) -> RequestRecord:
    r = RequestRecord(index, 10, 4, status=503)
    r.fail("HTTP 503: overloaded", 0.01)
    return r


def test_stats_interpolates_percentiles_linearly():
    s = stats([float(x) for x in range(1, 101)])
    assert s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert stats([7.0]) == {"mean": 7.0, "p50": 7.0, "p90": 7.0, "p99": 7.0}
    assert stats([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_record_derives_ttft_tpot_itl_e2e():
    r = ok_record(0, [0.10, 0.15, 0.25, 0.30], end_s=0.31)
    assert r.ttft_s == pytest.approx(0.10)
    assert r.tpot_s == pytest.approx((0.30 - 0.10) / 3)
    assert r.itl_s == pytest.approx([0.05, 0.10, 0.05])
    assert r.e2e_s == pytest.approx(0.31)
    assert r.meets_slo(ttft_s=0.1, tpot_s=0.07)
    assert not r.meets_slo(ttft_s=0.09, tpot_s=1.0)
    assert not r.meets_slo(ttft_s=1.0, tpot_s=0.06)


def test_tpot_divides_by_usage_tokens_not_chunks():
    # two chunks of two tokens each: the first token at 0.2, the fourth at 0.5
    r = ok_record(0, [0.2, 0.5], end_s=0.5, output_tokens=4, chunk_tokens=[2, 2])
    assert r.tpot_s == pytest.approx(0.3 / 3)
    assert r.itl_s == pytest.approx([0.3])


def test_one_token_has_no_tpot_and_meets_that_half():
    r = ok_record(0, [0.2], end_s=0.21)
    assert r.tpot_s is None and r.itl_s == []
    assert r.meets_slo(ttft_s=0.2, tpot_s=1e-9)


def test_failed_request_has_no_latencies_and_never_meets_slo():
    r = failed_record(0)
    r.chunk_s = [0.001]  # a token before an error event does not make it a success
    assert r.ttft_s is None and r.tpot_s is None and r.e2e_s is None and r.itl_s == []
    assert not r.meets_slo(ttft_s=10.0, tpot_s=10.0)


def test_summarize_goodput_throughput_and_errors():
    records = [
        ok_record(0, [0.1, 0.2, 0.3], end_s=0.3, prompt_tokens=12),  # meets both
        ok_record(1, [0.2, 0.25], end_s=0.25),  # meets both; no usage: input_len counts
        ok_record(2, [1.5, 1.6, 1.7], end_s=1.7),  # TTFT 1500 ms > 1000
        failed_record(3),
    ]
    s = summarize(records, wall_s=2.0, slo_ttft_ms=1000, slo_tpot_ms=100)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["errors"] == {"HTTP 503: overloaded": 1}
    assert s["slo_met"] == 2
    assert s["goodput"] == pytest.approx(2 / 2.0)
    assert s["slo_attainment"] == pytest.approx(0.5)
    assert s["request_throughput"] == pytest.approx(3 / 2.0)
    assert s["output_tokens"] == 3 + 2 + 3
    assert s["output_throughput"] == pytest.approx(8 / 2.0)
    assert s["input_tokens"] == 12 + 10 + 10
    assert s["total_token_throughput"] == pytest.approx((32 + 8) / 2.0)
    assert s["ttft_ms"]["mean"] == pytest.approx((100 + 200 + 1500) / 3)
    assert s["ttft_ms"]["p50"] == pytest.approx(200)
    # TPOT: 100, 50, 100 ms; ITL pools every gap: 100, 100, 50, 100, 100 ms
    assert s["tpot_ms"]["mean"] == pytest.approx(250 / 3)
    assert s["itl_ms"]["mean"] == pytest.approx(90)
    assert s["itl_ms"]["p50"] == pytest.approx(100)
    assert s["e2e_ms"]["p99"] == pytest.approx(stats([300, 250, 1700])["p99"])


def test_summarize_tighter_tpot_slo_lowers_goodput():
    records = [ok_record(k, [0.5, 0.5 + 0.0625 * (k + 1)], end_s=1.0) for k in range(5)]
    # TPOTs are 62.5, 125, 187.5, 250, 312.5 ms (exact in binary: the boundaries count)
    met = [summarize(records, 1.0, 1000, slo)["slo_met"] for slo in (50, 62.5, 200, 312.5)]
    assert met == [0, 1, 3, 5]


def test_summarize_rejects_bad_wall_time():
    with pytest.raises(ValueError, match="wall_s"):
        summarize([], wall_s=0.0, slo_ttft_ms=1, slo_tpot_ms=1)


def test_records_round_trip_through_json_to_the_same_summary(tmp_path):
    records = [ok_record(0, [0.1, 0.2, 0.4], 0.4, prompt_tokens=9), failed_record(1)]
    s = summarize(records, 1.0, 2000, 100)
    result = {"schema": SCHEMA, "label": "x", "runs": [{"rate": 2.0, "summary": s}]}
    result["runs"][0]["records"] = [r.to_json() for r in records]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    loaded = load_result(path)
    assert summarize(records_of(loaded["runs"][0]), 1.0, 2000, 100) == s


def test_load_result_rejects_other_files(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"schema": "something-else"}')
    with pytest.raises(ValueError, match="not a bench.serve result"):
        load_result(path)


def test_tables_show_the_numbers():
    records = [ok_record(0, [0.1, 0.2], end_s=0.2), failed_record(1)]
    s = summarize(records, 2.0, 2000, 100)
    table = run_table("colocated", 4.0, s)
    assert "colocated @ 4 req/s" in table
    assert "1 ok / 1 failed of 2" in table
    assert "goodput         0.500 req/s  (50.0% meet" in table
    assert "error x1: HTTP 503: overloaded" in table
    ttft_row = next(line for line in table.splitlines() if line.startswith("TTFT"))
    assert ttft_row.split()[1:] == ["100.00"] * 4
    sweep = sweep_table("colocated", [{"rate": "inf", "summary": s}])
    row = sweep.splitlines()[-1].split()
    assert row[:4] == ["inf", "0.500", "0.500", "50.0"] and row[-1] == "1"


def _run(rate: float, ttfts: list[float], lens: list[int], failed: int = -1) -> dict:
    records = [
        ok_record(i, [t, t + 0.01], t + 0.01, input_len=n)
        for i, (t, n) in enumerate(zip(ttfts, lens))
    ]
    if failed >= 0:
        records[failed].fail("HTTP 503: overloaded", 0.01)
    return {"rate": rate, "records": [r.to_json() for r in records]}


def test_paired_ttft_compares_request_by_request_and_only_the_same_trace():
    lens = [100, 800, 400]
    base = _run(1.0, [0.10, 0.40, 0.20], lens)
    other = _run(1.0, [0.11, 0.44, 0.30], lens, failed=2)  # the failed pair is left out
    p = paired_ttft(base, other)
    assert p["pairs"] == 2
    assert p["ratio_p50"] == pytest.approx(1.1) and p["diff_ms_p50"] == pytest.approx(25.0)
    assert paired_ttft(base, _run(1.0, [0.1, 0.4, 0.2], [100, 800, 401])) is None
    table = paired_table("a", "b", [base], [_run(2.0, [0.1] * 3, lens), other])
    assert "1.100" in table and table.count("\n") == 3  # title, header, the one shared rate


def test_compare_scores_stored_runs_again_under_a_given_slo(tmp_path, capsys):
    from pdserve.bench.serve import main as bench

    # TPOT 10 ms and 30 ms; TTFT 100 ms: both meet a 40 ms TPOT target, one meets 20 ms
    records = [ok_record(0, [0.1, 0.11], 0.11), ok_record(1, [0.1, 0.13], 0.13)]
    run = {
        "rate": 1.0,
        "records": [r.to_json() for r in records],
        "summary": summarize(records, 2.0, 1000.0, 40.0),
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema": SCHEMA, "label": "x", "runs": [run]}))
    assert bench(["--compare", str(path), "--no-plots"]) == 0
    assert "   100.0 " in capsys.readouterr().out  # as stored: both met it
    assert bench(["--compare", str(path), "--slo-tpot-ms", "20", "--no-plots"]) == 0
    assert "    50.0 " in capsys.readouterr().out  # re-scored: one of two
    assert json.loads(path.read_text())["runs"][0]["summary"]["slo_met"] == 2  # file untouched
