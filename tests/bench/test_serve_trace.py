"""The request trace: seeded lengths and arrivals, trace files, prompts, and flag checking."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pdserve.bench import serve
from pdserve.bench.trace import (
    MIN_TOKEN_ID,
    arrival_times,
    load_trace,
    parse_range,
    parse_rate,
    prompt_text,
    prompt_token_ids,
    synthetic_trace,
)


def test_same_seed_same_trace_other_seed_other_trace():
    a = synthetic_trace(50, (8, 64), (1, 32), 4.0, "poisson", seed=3)
    b = synthetic_trace(50, (8, 64), (1, 32), 4.0, "poisson", seed=3)
    c = synthetic_trace(50, (8, 64), (1, 32), 4.0, "poisson", seed=4)
    assert a == b
    assert [r.input_len for r in a.requests] != [r.input_len for r in c.requests]
    assert [r.arrival_s for r in a.requests] != [r.arrival_s for r in c.requests]


def test_ranges_are_inclusive_and_fixed_lengths_fixed():
    t = synthetic_trace(2000, (5, 9), 7, math.inf, "fixed", seed=0)
    ins = [r.input_len for r in t.requests]
    assert set(ins) == {5, 6, 7, 8, 9}  # both ends reached, nothing outside
    assert {r.output_len for r in t.requests} == {7}
    assert t.source == "uniform"
    assert synthetic_trace(3, 4, 5, 1.0, "fixed", 0).source == "fixed"


def test_fixed_rate_spaces_requests_evenly_and_inf_sends_all_at_once():
    assert arrival_times(5, 4.0, "fixed", seed=0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert arrival_times(4, math.inf, "poisson", seed=0) == [0.0] * 4


def test_poisson_gaps_have_mean_one_over_rate():
    rate = 8.0
    times = arrival_times(20_000, rate, "poisson", seed=1)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    assert times == arrival_times(20_000, rate, "poisson", seed=1)


def test_a_new_rate_keeps_the_lengths():
    t = synthetic_trace(20, (8, 64), (4, 16), 2.0, "poisson", seed=5)
    u = t.at_rate(10.0, "fixed")
    assert [(r.input_len, r.output_len) for r in t.requests] == [
        (r.input_len, r.output_len) for r in u.requests
    ]
    assert [r.arrival_s for r in u.requests] == [k / 10.0 for k in range(20)]
    assert (u.rate, u.arrival) == (10.0, "fixed")


def test_bad_trace_parameters_name_the_value():
    with pytest.raises(ValueError, match="-1"):
        arrival_times(3, -1.0, "fixed", 0)
    with pytest.raises(ValueError, match="'gamma'"):
        arrival_times(3, 1.0, "gamma", 0)
    with pytest.raises(ValueError, match="9:3"):
        synthetic_trace(3, (9, 3), 4, 1.0, "fixed", 0)
    with pytest.raises(ValueError, match="got 0"):
        synthetic_trace(0, 4, 4, 1.0, "fixed", 0)


def test_trace_file_with_and_without_arrivals(tmp_path):
    timed = tmp_path / "timed.jsonl"
    rows = [{"input_len": 5, "output_len": 3, "arrival_s": 0.5}, {"input_len": 7, "output_len": 2}]
    rows[1]["arrival_s"] = 0.1
    timed.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    t = load_trace(timed, seed=0)
    assert [(r.input_len, r.arrival_s) for r in t.requests] == [(7, 0.1), (5, 0.5)]  # sorted
    assert t.arrival == "file" and t.rate is None
    assert len(load_trace(timed, seed=0, n=1)) == 1

    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"input_len": 5, "output_len": 3}\n')
    assert load_trace(bare, seed=0).arrival == "fixed"


@pytest.mark.parametrize(
    "text, match",
    [
        (
            '{"input_len": 5, "output_len": 3, "arrival_s": 0}\n{"input_len": 5, "output_len": 3}',
            "1 of 2 requests have arrival_s",
        ),
        ('{"input_len": 0, "output_len": 3}', "input_len 0"),
        ('{"input_len": 4, "output_len": 2.5}', "output_len 2.5"),
        ('{"input_len": 4, "output_len": 2, "arrival_s": -1}', "arrival_s -1"),
        ("not json", "is not a JSON object"),
        ("", "holds no requests"),
    ],
)
def test_bad_trace_files_are_rejected(tmp_path, text, match):
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_trace(path, seed=0)


def test_asking_for_more_requests_than_the_file_has(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"input_len": 5, "output_len": 3}\n')
    with pytest.raises(ValueError, match="--num-requests 2 exceeds the 1"):
        load_trace(path, seed=0, n=2)


def test_trace_read_back_from_a_result_file(tmp_path):
    t = synthetic_trace(6, (8, 64), (4, 16), 3.0, "poisson", seed=2)
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"schema": "x", "trace": t.to_json()}))
    back = load_trace(path, seed=2)
    assert back.requests == t.requests


def test_prompts_are_exact_length_in_range_and_seeded():
    ids = prompt_token_ids(seed=0, run=0, index=3, length=500, vocab_high=50)
    assert len(ids) == 500 and min(ids) >= MIN_TOKEN_ID and max(ids) < 50
    assert ids == prompt_token_ids(0, 0, 3, 500, 50)
    assert ids != prompt_token_ids(0, 0, 4, 500, 50)  # another request
    assert ids != prompt_token_ids(0, 1, 3, 500, 50)  # another run of a sweep
    assert len(prompt_text(0, 0, 3, 40).split()) == 40


def test_parse_range_and_rate():
    assert parse_range("3:9", "--input-len-range") == (3, 9)
    assert parse_rate("2.5") == 2.5 and parse_rate("inf") == math.inf
    for bad in ("3", "a:b", "0:4", "5:4", "1:2:3"):
        with pytest.raises(ValueError, match=f"--input-len-range '{bad}'"):
            parse_range(bad, "--input-len-range")
    for bad in ("0", "-2", "fast", "nan"):
        with pytest.raises(ValueError, match=f"'{bad}'"):
            parse_rate(bad)


def parsed(*argv: str):
    p = serve.argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--rate", "2", "--sweep-rates", "1,2"], "not both"),
        (["--sweep-rates", "1,0"], "'0'"),
        (["--input-len", "8", "--input-len-range", "1:4"], "--input-len 8 or --input-len-range"),
        (["--output-len", "0"], "--output-len must be >= 1, got 0"),
        (["--max-concurrency", "0"], "--max-concurrency must be >= 1, got 0"),
        (["--num-requests", "-3"], "--num-requests must be >= 1, got -3"),
        (["--slo-tpot-ms", "0"], "--slo-tpot-ms must be > 0"),
        (["--trace", "t.jsonl", "--output-len", "4"], "drop --output-len"),
    ],
)
def test_conflicting_or_bad_flags(argv, match):
    with pytest.raises(ValueError, match=match):
        serve.plan(parsed(*argv))


def test_plan_defaults_and_sweep():
    trace, rates = serve.plan(parsed("--num-requests", "4", "--sweep-rates", "1,inf"))
    assert rates == [1.0, math.inf] and len(trace) == 4
    assert {(r.input_len, r.output_len) for r in trace.requests} == {(512, 128)}
    _, rates = serve.plan(parsed())
    assert rates == [math.inf]


def test_vocab_size_from_flag_or_config(tmp_path):
    assert serve.vocab_high_of(parsed()) == 1000
    assert serve.vocab_high_of(parsed("--vocab-size", "77")) == 77
    (tmp_path / "config.json").write_text('{"vocab_size": 129280}')
    assert serve.vocab_high_of(parsed("--model-path", str(tmp_path))) == 129280
    with pytest.raises(ValueError, match="vocabulary size 3"):
        serve.vocab_high_of(parsed("--vocab-size", "3"))
    with pytest.raises(ValueError, match="no vocab_size"):
        serve.vocab_high_of(parsed("--model-path", str(tmp_path / "missing")))


def test_main_reports_bad_flags_with_exit_code_2(capsys):
    assert serve.main(["--rate", "fast"]) == 2
    assert "request rate 'fast'" in capsys.readouterr().err
