"""A serving run's summary (latency percentiles, throughputs, goodput), its tables, and the
result file.

``summarize`` is a pure function of the per-request records, the wall time and the SLO, so any
number in a result file can be recomputed from the records stored beside it.

Definitions (``wall_s``: from the start of the run to the end of its last request):
- latency stats (TTFT, TPOT, ITL, E2E, in ms) are over successful requests only; ITL pools the
  gaps of every successful request; percentiles interpolate linearly (numpy's default);
- request throughput = successful requests / wall_s; output token throughput = their output
  tokens / wall_s; total token throughput adds their prompt tokens (usage, else input_len);
- goodput = requests meeting both SLOs / wall_s; a failed request never meets them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pdserve.bench.request_record import RequestRecord
from pdserve.bench.trace import rate_from_json

SCHEMA = "pdserve.bench.serve/1"  # the "schema" field of every result file
PERCENTILES = (50, 90, 99)
METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def stats(values_ms: list[float]) -> dict[str, float | None]:
    """Mean and p50/p90/p99 of ``values_ms``; all None when there are none."""
    keys = ["mean"] + [f"p{p}" for p in PERCENTILES]
    if not values_ms:
        return dict.fromkeys(keys)
    a = np.asarray(values_ms, dtype=np.float64)
    out = {"mean": float(a.mean())}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES})
    return out


def summarize(
    records: list[RequestRecord], wall_s: float, slo_ttft_ms: float, slo_tpot_ms: float
) -> dict:
    """The summary of one run (see the module docstring for each definition)."""
    if not wall_s > 0:
        raise ValueError(f"wall_s must be > 0, got {wall_s}")
    good = [r for r in records if r.ok]
    ttft = [r.ttft_s * 1e3 for r in good]
    tpot = [r.tpot_s * 1e3 for r in good if r.tpot_s is not None]
    itl = [gap * 1e3 for r in good for gap in r.itl_s]
    e2e = [r.e2e_s * 1e3 for r in good]
    out_tokens = sum(r.output_tokens or 0 for r in good)
    in_tokens = sum(r.input_len if r.prompt_tokens is None else r.prompt_tokens for r in good)
    met = sum(r.meets_slo(slo_ttft_ms / 1e3, slo_tpot_ms / 1e3) for r in records)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    return {
        "requests": len(records),
        "completed": len(good),
        "failed": len(records) - len(good),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),  # most common 10
        "wall_s": wall_s,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(good) / wall_s,
        "output_throughput": out_tokens / wall_s,
        "total_token_throughput": (in_tokens + out_tokens) / wall_s,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "slo_met": met,
        "slo_attainment": met / len(records) if records else 0.0,
        "goodput": met / wall_s,
        "ttft_ms": stats(ttft),
        "tpot_ms": stats(tpot),
        "itl_ms": stats(itl),
        "e2e_ms": stats(e2e),
    }


def run_table(label: str, rate: float | str | None, s: dict) -> str:
    """One run's summary as a plain-text table."""
    head = f"== {label} @ {format_rate(rate)} req/s =="
    lines = [
        head,
        f"requests        {s['completed']} ok / {s['failed']} failed of {s['requests']}"
        f"  in {s['wall_s']:.2f} s",
        f"throughput      {s['request_throughput']:.3f} req/s, "
        f"{s['output_throughput']:.1f} output tok/s, {s['total_token_throughput']:.1f} total tok/s",
        f"goodput         {s['goodput']:.3f} req/s  ({100 * s['slo_attainment']:.1f}% meet "
        f"TTFT <= {s['slo']['ttft_ms']:g} ms and TPOT <= {s['slo']['tpot_ms']:g} ms)",
        f"{'ms':<8}" + "".join(f"{k:>10}" for k in ("mean", "p50", "p90", "p99")),
    ]
    for key, name in METRICS:
        st = s[key]
        lines.append(
            f"{name:<8}" + "".join(_cell(st[k], 10) for k in ("mean", "p50", "p90", "p99"))
        )
    for message, count in s["errors"].items():
        lines.append(f"error x{count}: {message}")
    return "\n".join(lines + [""])


def sweep_table(label: str, runs: list[dict]) -> str:
    """One row per run: offered rate, achieved throughput, goodput, TTFT/TPOT p50 and p99."""
    cols = ("rate", "req/s", "goodput", "SLO %", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50")
    cols += ("TPOT p99", "failed")
    lines = [f"== {label}: summary ==", "".join(f"{c:>10}" for c in cols)]
    for run in runs:
        s = run["summary"]
        cells = [f"{format_rate(run['rate']):>10}", _cell(s["request_throughput"], 10, 3)]
        cells += [_cell(s["goodput"], 10, 3), _cell(100 * s["slo_attainment"], 10, 1)]
        cells += [_cell(s["output_throughput"], 10, 1)]
        cells += [_cell(s[k][p], 10) for k in ("ttft_ms", "tpot_ms") for p in ("p50", "p99")]
        cells.append(f"{s['failed']:>10}")
        lines.append("".join(cells))
    return "\n".join(lines + [""])


def paired_ttft(base: dict, other: dict) -> dict | None:
    """``other``'s TTFT against ``base``'s request by request, for two runs of one trace (the
    same prompt lengths in the same order; None otherwise): medians of the ratio and of the
    difference say more than two p50s of prompts whose lengths vary."""
    a, b = records_of(base), records_of(other)
    if [r.input_len for r in a] != [r.input_len for r in b]:
        return None
    pairs = [(x.ttft_s, y.ttft_s) for x, y in zip(a, b) if x.ok and y.ok]
    if not pairs:
        return None
    ratio = np.asarray([y / x for x, y in pairs])
    diff = np.asarray([(y - x) * 1e3 for x, y in pairs])
    return {
        "pairs": len(pairs), "ratio_p50": float(np.median(ratio)),
        "ratio_p90": float(np.percentile(ratio, 90)), "diff_ms_p50": float(np.median(diff)),
        "diff_ms_mean": float(diff.mean()),
    }  # fmt: skip


def paired_table(base_label: str, other_label: str, base: list[dict], other: list[dict]) -> str:
    """``paired_ttft`` for each rate both sweeps ran (of a repeated rate, the later run: warm)."""
    lines = [f"== TTFT of {other_label} against {base_label}, request by request ==",
             "".join(f"{c:>12}" for c in ("rate", "pairs", "ratio p50", "ratio p90",
                                           "diff p50 ms", "diff mean"))]  # fmt: skip
    base_at = {format_rate(run["rate"]): run for run in base}
    other_at = {format_rate(run["rate"]): run for run in other}
    for rate, run in base_at.items():
        p = rate in other_at and paired_ttft(run, other_at[rate])
        if p:
            cells = [f"{rate:>12}", f"{p['pairs']:>12}"]
            cells += [_cell(p[k], 12, 3) for k in ("ratio_p50", "ratio_p90")]
            cells += [_cell(p[k], 12, 1) for k in ("diff_ms_p50", "diff_ms_mean")]
            lines.append("".join(cells))
    return "\n".join(lines + [""])


def format_rate(rate: float | str | None) -> str:
    rate = rate_from_json(rate)
    if rate is None:
        return "trace"
    return "inf" if rate == float("inf") else f"{rate:g}"


def write_result(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return path


def load_result(path: str | Path) -> dict:
    """A result file written by ``bench.serve``; ValueError if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read result file {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a bench.serve result (schema {SCHEMA!r})")
    return doc


def records_of(run: dict) -> list[RequestRecord]:
    return [RequestRecord.from_json(d) for d in run["records"]]


def _cell(value: float | None, width: int, digits: int = 2) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
