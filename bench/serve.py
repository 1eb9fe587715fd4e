"""Load generator for an OpenAI-compatible server: ``pdserve bench`` (``python -m
pdserve.bench.serve``).

Streams a seeded trace of requests (fixed or uniform lengths, or a JSON-lines file) at a fixed or
Poisson rate, or at several rates (``--sweep-rates``), and reports TTFT, TPOT, ITL and E2E
percentiles, throughputs and goodput under a TTFT/TPOT SLO. Prints a table per run, writes
``bench/results/serve-<label>-<timestamp>.json`` (config, trace, per-request records, summaries)
and PNG plots next to it. ``--compare A.json B.json`` only reads earlier results and plots them
on one figure (e.g. disaggregated against colocated).

Result file: ``{"schema", "label", "created", "host", "config", "trace": {"seed", "source",
"rate", "arrival", "requests": [{"input_len", "output_len", "arrival_s"}]}, "runs": [{"rate",
"arrival", "started", "wall_s", "summary", "records": [RequestRecord.to_json()]}]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import aiohttp

from pdserve.bench import conversations
from pdserve.bench.load_runner import LoadRunner, RequestShape, wall_s
from pdserve.bench.serve_plots import plot_compare, plot_run
from pdserve.bench.serve_report import (
    SCHEMA,
    load_result,
    paired_table,
    records_of,
    run_table,
    summarize,
    sweep_table,
    write_result,
)
from pdserve.bench.sse_client import SSEClient
from pdserve.bench.trace import (
    ARRIVALS,
    DEFAULT_VOCAB_HIGH,
    MIN_TOKEN_ID,
    Trace,
    load_trace,
    parse_range,
    parse_rate,
    rate_to_json,
    synthetic_trace,
)

RESULTS = Path(__file__).parent / "results"
DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN, DEFAULT_NUM_REQUESTS = 512, 128, 100
SLO_TTFT_MS, SLO_TPOT_MS = 2000.0, 100.0  # the SLO goodput counts against, by default
# load-generator flags the multi-turn chat trace (--conversations) has no use for
CHAT_CLASHES = (
    "--chat", "--trace", "--sweep-rates", "--compare", "--num-requests", "--rate", "--input-len",
    "--input-len-range", "--output-len-range", "--max-concurrency",
)  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The load generator's flags, on ``p`` (its own parser, or a ``pdserve bench`` one)."""
    g = p.add_argument_group("server")
    g.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    g.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    g.add_argument("--model-path", help="checkpoint dir: vocab_size from its config.json")
    g.add_argument("--vocab-size", type=int, help="prompt ids in [4, V) (wins over --model-path)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token")
    g.add_argument("--chat", action="store_true", help="use /v1/chat/completions (text prompts)")
    g.add_argument("--no-token-ids", action="store_true", help="don't ask for return_token_ids")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--timeout-s", type=float, default=600.0, help="stall limit per request")
    g = p.add_argument_group("load")
    g.add_argument("--num-requests", type=int, help=f"default {DEFAULT_NUM_REQUESTS}")
    g.add_argument("--rate", help="requests/s, or inf (default: inf, or the trace's arrivals)")
    g.add_argument("--arrival", choices=ARRIVALS, default="fixed", help="interval process")
    g.add_argument("--sweep-rates", help="comma-separated rates: one full run each")
    g.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    g.add_argument("--input-len", type=int, help=f"prompt tokens (default {DEFAULT_INPUT_LEN})")
    g.add_argument("--output-len", type=int, help=f"output tokens (default {DEFAULT_OUTPUT_LEN})")
    g.add_argument("--input-len-range", help="a:b, uniform, inclusive")
    g.add_argument("--output-len-range", help="a:b, uniform, inclusive")
    g.add_argument("--trace", help="JSON lines {input_len, output_len, arrival_s?} or a result")
    g.add_argument("--seed", type=int, default=0, help="fixes lengths, arrivals and prompts")
    g.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    g = p.add_argument_group("report")
    g.add_argument(
        "--slo-ttft-ms", type=float, help=f"default {SLO_TTFT_MS:g}; with --compare: re-score"
    )
    g.add_argument(
        "--slo-tpot-ms", type=float, help=f"default {SLO_TPOT_MS:g}; with --compare: re-score"
    )
    g.add_argument("--label", help="names this deployment in results and plots (default: model)")
    g.add_argument("--out", help="result JSON path (with --compare: the PNG path)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--compare", nargs="+", metavar="RESULT", help="plot earlier results only")
    conversations.add_arguments(p, standalone=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pdserve.bench.serve", description=__doc__.split("\n")[0]
    )
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run what the parsed flags ask for; 0 on success, 2 for bad flags, 1 when the server
    cannot be reached or every request failed."""
    if args.conversations is not None:
        clash = [f for f in CHAT_CLASHES if getattr(args, f.lstrip("-").replace("-", "_"))]
        if clash:
            drop = ", ".join(clash)
            print(f"error: --conversations runs its own trace; drop {drop}", file=sys.stderr)
            return 2
        return conversations.run_args(args)
    try:
        if args.compare:
            return compare(args)
        trace, rates = plan(args)
        vocab_high = vocab_high_of(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_bench(args, trace, rates, vocab_high))
    except (aiohttp.ClientError, RuntimeError, OSError) as e:
        print(f"error: {args.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    runs = result["runs"]
    if len(runs) > 1:
        print(sweep_table(result["label"], runs))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(args.out) if args.out else RESULTS / f"serve-{_slug(result['label'])}-{stamp}.json"
    print(f"wrote {write_result(result, path)}")
    if not args.no_plots:
        for png in plot_run(result, path.with_suffix("")):
            print(f"wrote {png}")
    return 0 if any(r["summary"]["completed"] for r in runs) else 1


def plan(args: argparse.Namespace) -> tuple[Trace, list[float | None]]:
    """The trace and the rate of each run (None: the trace file's own arrivals).
    ValueError names a bad or conflicting flag."""
    for flag in ("num_requests", "max_concurrency"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    args.slo_ttft_ms = SLO_TTFT_MS if args.slo_ttft_ms is None else args.slo_ttft_ms
    args.slo_tpot_ms = SLO_TPOT_MS if args.slo_tpot_ms is None else args.slo_tpot_ms
    for flag in ("slo_ttft_ms", "slo_tpot_ms", "timeout_s"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.rate is not None and args.sweep_rates is not None:
        raise ValueError(f"give --rate {args.rate} or --sweep-rates {args.sweep_rates}, not both")
    if args.sweep_rates is not None:
        rates: list[float | None] = [parse_rate(r) for r in args.sweep_rates.split(",")]
    else:
        rates = [None if args.rate is None else parse_rate(args.rate)]
    if args.trace:
        given = [
            f
            for f in ("input_len", "output_len", "input_len_range", "output_len_range")
            if getattr(args, f) is not None
        ]
        if given:
            raise ValueError(f"--trace sets the lengths; drop --{given[0].replace('_', '-')}")
        trace = load_trace(args.trace, args.seed, args.num_requests)
        if trace.arrival == "fixed":  # the file has no arrivals
            rates = [math.inf if r is None else r for r in rates]
        return trace, rates
    ins = _lengths(args.input_len, args.input_len_range, DEFAULT_INPUT_LEN, "input")
    outs = _lengths(args.output_len, args.output_len_range, DEFAULT_OUTPUT_LEN, "output")
    rates = [math.inf if r is None else r for r in rates]
    n = args.num_requests or DEFAULT_NUM_REQUESTS
    return synthetic_trace(n, ins, outs, rates[0], args.arrival, args.seed), rates


def vocab_high_of(args: argparse.Namespace) -> int:
    """The end of the prompt-id range: --vocab-size, config.json's vocab_size, or 1000."""
    if args.vocab_size is not None:
        high, where = args.vocab_size, "--vocab-size"
    elif args.model_path:
        config = Path(args.model_path) / "config.json"
        try:
            high, where = int(json.loads(config.read_text())["vocab_size"]), str(config)
        except (OSError, ValueError, KeyError) as e:
            msg = f"--model-path {args.model_path}: no vocab_size in {config}: {e}"
            raise ValueError(msg) from None
    else:
        return DEFAULT_VOCAB_HIGH
    if high <= MIN_TOKEN_ID:
        raise ValueError(f"vocabulary size {high} (from {where}) must be > {MIN_TOKEN_ID}")
    return high


def compare(args: argparse.Namespace) -> int:
    """Tables and one figure of earlier result files; nothing is sent. An SLO flag scores
    every run's records again under it (the other SLO as each run had it)."""
    results = [load_result(p) for p in args.compare]
    if args.slo_ttft_ms is not None or args.slo_tpot_ms is not None:
        for result in results:
            for run in result["runs"]:
                slo = run["summary"]["slo"]
                run["summary"] = summarize(
                    records_of(run),
                    run["summary"]["wall_s"],
                    slo["ttft_ms"] if args.slo_ttft_ms is None else args.slo_ttft_ms,
                    slo["tpot_ms"] if args.slo_tpot_ms is None else args.slo_tpot_ms,
                )
    labels = [r["label"] for r in results]
    labels = [
        f"{lab} ({Path(p).stem})" if labels.count(lab) > 1 else lab
        for lab, p in zip(labels, args.compare)
    ]
    for result, label in zip(results, labels):
        print(sweep_table(label, result["runs"]))
    if len(results) == 2:
        print(paired_table(*labels, results[0]["runs"], results[1]["runs"]))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(args.out) if args.out else RESULTS / f"compare-{stamp}.png"
    if not args.no_plots:
        for png in plot_compare(results, labels, path):
            print(f"wrote {png}")
    return 0


async def _bench(
    args: argparse.Namespace, trace: Trace, rates: list[float | None], vocab_high: int
) -> dict:
    limit = args.max_concurrency or 0
    async with SSEClient(args.url, args.api_key, args.timeout_s, limit) as client:
        model = args.model or await _served_model(client)
        label = args.label or model
        shape = RequestShape(model, args.chat, args.temperature, not args.no_token_ids, vocab_high)
        runner = LoadRunner(client, shape, args.max_concurrency, not args.no_progress)
        if args.warmup:
            failed = [r for r in await runner.warmup(trace, args.warmup) if not r.ok]
            if failed:
                print(f"warmup: {len(failed)} failed, e.g. {failed[0].error}", file=sys.stderr)
        runs = []
        for k, rate in enumerate(rates):
            t = trace if rate is None else trace.at_rate(rate, args.arrival)
            started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            records = await runner.run(t, k, f"{label} @ {rate_to_json(rate) or 'trace'} req/s")
            wall = wall_s(records)
            summary = summarize(records, wall, args.slo_ttft_ms, args.slo_tpot_ms)
            print(run_table(label, rate_to_json(rate), summary), flush=True)
            runs.append(
                {
                    "rate": rate_to_json(rate),
                    "arrival": t.arrival,
                    "started": started,
                    "wall_s": wall,
                    "summary": summary,
                    "records": [r.to_json() for r in records],
                }
            )
    first = trace if rates[0] is None else trace.at_rate(rates[0], args.arrival)
    config = {k: v for k, v in vars(args).items() if _plain(v)}
    config.update(model=model, path=shape.path, vocab_high=vocab_high, min_token_id=MIN_TOKEN_ID)
    config["api_key"] = "(set)" if args.api_key else None  # never write the secret
    config["rates"] = [rate_to_json(r) for r in rates]
    return {
        "schema": SCHEMA,
        "label": label,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"node": platform.node(), "python": platform.python_version()},
        "config": config,
        "trace": first.to_json(),
        "runs": runs,
    }


async def _served_model(client: SSEClient) -> str:
    ids = await client.model_ids()
    if not ids:
        raise RuntimeError("GET /v1/models lists no model; pass --model")
    if len(ids) > 1:
        print(f"the server lists {ids}; using {ids[0]!r} (pass --model)", file=sys.stderr)
    return ids[0]


def _lengths(fixed: int | None, span: str | None, default: int, what: str) -> int | tuple[int, int]:
    if fixed is not None and span is not None:
        raise ValueError(f"give --{what}-len {fixed} or --{what}-len-range {span}, not both")
    if span is not None:
        return parse_range(span, f"--{what}-len-range")
    if fixed is not None and fixed < 1:
        raise ValueError(f"--{what}-len must be >= 1, got {fixed}")
    return default if fixed is None else fixed


def _plain(v: object) -> bool:
    return v is None or isinstance(v, str | int | float | bool | list)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "serve"


if __name__ == "__main__":
    sys.exit(main())
