"""``bench.serve`` end to end against a real server: the repo's OpenAI app over a live engine on
the tiny model, under uvicorn (``conftest.py``). Checks the result file, not speeds."""

from __future__ import annotations

import importlib.util
import json
import socket

import pytest

from pdserve.bench.request_record import RequestRecord
from pdserve.bench.serve import main
from pdserve.bench.serve_report import SCHEMA, summarize
from pdserve.bench.trace import arrival_times

from .conftest import MODEL

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def bench(*argv: str) -> int:
    return main([*argv, "--no-progress"])


def test_completions_at_a_poisson_rate(server_url, tiny_model, tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = bench(
        "--url", server_url, "--num-requests", "16", "--rate", "16", "--arrival", "poisson",
        "--input-len-range", "8:40", "--output-len-range", "4:16", "--seed", "7",
        "--model-path", tiny_model, "--label", "colocated", "--out", str(out),
        "--slo-ttft-ms", "5000", "--slo-tpot-ms", "1000",
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["schema"] == SCHEMA and result["label"] == "colocated"
    assert result["config"]["model"] == MODEL  # from GET /v1/models
    assert result["config"]["vocab_high"] == 1024  # the tiny model's config.json
    (run,) = result["runs"]
    assert run["rate"] == 16.0 and run["arrival"] == "poisson"

    records = [RequestRecord.from_json(d) for d in run["records"]]
    trace = result["trace"]["requests"]
    assert len(records) == len(trace) == 16
    assert [r.scheduled_s for r in records] == arrival_times(16, 16.0, "poisson", seed=7)
    for rec, req in zip(records, trace):
        assert rec.ok and rec.status == 200 and rec.error is None, rec.error
        assert (rec.input_len, rec.output_len) == (req["input_len"], req["output_len"])
        assert rec.prompt_tokens == rec.input_len  # token-id prompts: exact lengths
        assert rec.output_tokens == rec.output_len  # ignore_eos: every token asked for
        assert sum(rec.chunk_tokens) == rec.output_tokens  # return_token_ids: exact counts
        assert rec.finish_reason == "length"
        assert rec.sent_s >= rec.scheduled_s
        assert 0 < rec.ttft_s <= rec.e2e_s
        assert rec.tpot_s > 0 and all(gap >= 0 for gap in rec.itl_s)
        assert rec.chunk_s == sorted(rec.chunk_s)

    s = run["summary"]
    assert (s["requests"], s["completed"], s["failed"]) == (16, 16, 0)
    assert s["output_tokens"] == sum(r["output_len"] for r in trace)
    assert s["input_tokens"] == sum(r["input_len"] for r in trace)
    assert run["wall_s"] == pytest.approx(max(r.sent_s + r.end_s for r in records))
    assert s["request_throughput"] == pytest.approx(16 / run["wall_s"])
    assert 0 < s["goodput"] <= s["request_throughput"]
    assert s["slo_met"] == sum(r.meets_slo(5.0, 1.0) for r in records)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        st = s[key]
        assert 0 < st["p50"] <= st["p90"] <= st["p99"], key
    assert s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"]
    # every number is a function of the stored records
    assert summarize(records, run["wall_s"], 5000, 1000) == s

    printed = capsys.readouterr().out
    assert "== colocated @ 16 req/s ==" in printed
    assert "16 ok / 0 failed of 16" in printed


def test_chat_sweep_under_a_concurrency_cap_then_compare(server_url, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    rc = bench(
        "--url", server_url, "--chat", "--num-requests", "6", "--sweep-rates", "10,30,inf",
        "--max-concurrency", "2", "--input-len-range", "4:24", "--output-len-range", "2:8",
        "--warmup", "1", "--label", "disagg", "--out", str(out),
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["config"]["path"] == "/v1/chat/completions"
    assert [run["rate"] for run in result["runs"]] == [10.0, 30.0, "inf"]
    lengths = [
        [(d["input_len"], d["output_len"]) for d in run["records"]] for run in result["runs"]
    ]
    assert lengths[0] == lengths[1] == lengths[2]  # one trace, three rates
    for run in result["runs"]:
        records = [RequestRecord.from_json(d) for d in run["records"]]
        assert all(r.ok and r.output_tokens == r.output_len for r in records)
        assert all(r.prompt_tokens > 0 for r in records)  # chat: the template's tokens too
        for r in records:  # at most 2 in flight whenever one is sent
            in_flight = sum(q.sent_s <= r.sent_s < q.sent_s + q.end_s for q in records)
            assert in_flight <= 2
    printed = capsys.readouterr().out
    assert "== disagg: summary ==" in printed

    other = json.loads(out.read_text())
    other["label"] = "colocated"
    other_path = tmp_path / "colocated.json"
    other_path.write_text(json.dumps(other))
    png = tmp_path / "compare.png"
    assert bench("--compare", str(out), str(other_path), "--out", str(png)) == 0
    captured = capsys.readouterr()
    assert "== disagg: summary ==" in captured.out and "== colocated: summary ==" in captured.out
    if HAS_MATPLOTLIB:
        assert png.stat().st_size > 0
        assert (tmp_path / "sweep-cdf.png").stat().st_size > 0
        assert (tmp_path / "sweep-goodput.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in captured.err and not png.exists()


def test_rejected_requests_are_failures_with_their_status(server_url, tmp_path):
    out = tmp_path / "too-long.json"
    # prompts longer than the server's max_model_len (128): HTTP 400 for each
    rc = bench(
        "--url", server_url, "--num-requests", "3", "--input-len", "200", "--output-len", "4",
        "--out", str(out), "--no-plots",
    )  # fmt: skip
    assert rc == 1  # every request failed
    (run,) = json.loads(out.read_text())["runs"]
    for d in run["records"]:
        assert d["ok"] is False and d["status"] == 400
        assert d["error"].startswith("HTTP 400: ") and len(d["error"]) > len("HTTP 400: ")
        assert d["ttft_s"] is None
    s = run["summary"]
    assert (s["completed"], s["failed"], s["slo_met"], s["goodput"]) == (0, 3, 0, 0.0)
    assert sum(s["errors"].values()) == 3
    assert s["ttft_ms"]["p50"] is None


def test_unreachable_server(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    rc = bench("--url", f"http://127.0.0.1:{port}", "--num-requests", "1", "--out", str(tmp_path))
    assert rc == 1
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_the_chat_trace_refuses_load_generator_flags(capsys):
    from pdserve.deploy.cli import build_parser

    args = build_parser().parse_args(["bench", "--conversations", "2", "--rate", "4", "--chat"])
    assert args.fn(args) == 2
    assert "drop --chat, --rate" in capsys.readouterr().err


def test_the_chat_trace_through_pdserve_bench(server_url, tmp_path, capsys):
    from pdserve.deploy.cli import build_parser

    out = tmp_path / "conv.json"
    argv = [
        "bench",
        "--url",
        server_url,
        "--conversations",
        "2",
        "--turns",
        "2",
        "--output-len",
        "8",
    ]
    args = build_parser().parse_args(
        [*argv, "--system-len", "20", "--user-len", "4", "--out", str(out)]
    )
    assert args.fn(args) == 0
    result = json.loads(out.read_text())
    assert result["shape"]["vocab"] == 1000  # the trace's default: pdserve bench sets none
    assert [r["input_len"] for r in result["records"]] == [24, 36, 24, 36]
    assert result["summary"]["failed"] == 0
    assert "prompt_tokens_computed" in capsys.readouterr().out
