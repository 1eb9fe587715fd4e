"""PNG plots of serving results (matplotlib, optional: without it nothing is drawn and a line
on stderr says so).

- ``plot_run``: latency CDFs (TTFT, TPOT) with one line per rate, and, for two or more finite
  rates, goodput and request throughput against the offered rate;
- ``plot_compare``: several result files (deployments) on one figure: goodput, TTFT p50/p99 and
  TPOT p50/p99 against the offered rate, one line per label.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from pdserve.bench.serve_report import format_rate, records_of
from pdserve.bench.trace import rate_from_json


def plot_run(result: dict, stem: Path) -> list[Path]:
    """Plots of one result file next to ``stem`` (``<stem>-cdf.png``, ``<stem>-goodput.png``)."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in result["runs"]:
        good = [r for r in records_of(run) if r.ok]
        ttft = [r.ttft_s * 1e3 for r in good]
        tpot = [r.tpot_s * 1e3 for r in good if r.tpot_s is not None]
        for ax, values in zip(axes, (ttft, tpot)):
            if values:
                x = np.sort(values)
                y = np.arange(1, len(x) + 1) / len(x)
                ax.step(x, y, where="post", label=f"{format_rate(run['rate'])} req/s")
    slo = result["runs"][0]["summary"]["slo"]
    for ax, name, limit in zip(axes, ("TTFT", "TPOT"), (slo["ttft_ms"], slo["tpot_ms"])):
        ax.axvline(limit, color="grey", linestyle=":", label=f"SLO {limit:g} ms")
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", title=f"{name} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(result["label"])
    fig.tight_layout()
    written.append(_save(fig, stem.with_name(stem.name + "-cdf.png")))
    plt.close(fig)

    points = _rate_points(result)
    if len(points) >= 2:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        rates = [p[0] for p in points]
        ax.plot(rates, [p[1]["goodput"] for p in points], "o-", label="goodput")
        ax.plot(rates, [p[1]["request_throughput"] for p in points], "s--", label="throughput")
        ax.plot(rates, rates, ":", color="grey", label="offered")
        ax.set(xlabel="offered request rate (req/s)", ylabel="req/s", title=result["label"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, stem.with_name(stem.name + "-goodput.png")))
        plt.close(fig)
    return written


def plot_compare(results: list[dict], labels: list[str], path: Path) -> list[Path]:
    """Goodput and TTFT/TPOT percentiles against the offered rate, one line per result."""
    plt = _pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for result, label in zip(results, labels):
        points = _rate_points(result)
        if not points:
            print(f"{label}: no finite request rates to plot", file=sys.stderr)
            continue
        rates = [p[0] for p in points]
        line = axes[0].plot(rates, [p[1]["goodput"] for p in points], "o-", label=label)[0]
        color = line.get_color()
        for ax, key in zip(axes[1:], ("ttft_ms", "tpot_ms")):
            for pct, style in (("p50", "o-"), ("p99", "^--")):
                ys = [_nan(p[1][key][pct]) for p in points]
                ax.plot(rates, ys, style, color=color, label=f"{label} {pct}")
    titles = ("goodput (req/s)", "TTFT (ms)", "TPOT (ms)")
    for ax, title in zip(axes, titles):
        ax.set(xlabel="offered request rate (req/s)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    slo = results[0]["runs"][0]["summary"]["slo"]
    axes[1].axhline(slo["ttft_ms"], color="grey", linestyle=":")
    axes[2].axhline(slo["tpot_ms"], color="grey", linestyle=":")
    fig.tight_layout()
    out = [_save(fig, path)]
    plt.close(fig)
    return out


def _rate_points(result: dict) -> list[tuple[float, dict]]:
    """(offered rate, summary) of the runs at a finite rate, by rate."""
    points = []
    for run in result["runs"]:
        rate = rate_from_json(run["rate"])
        if rate is not None and math.isfinite(rate):
            points.append((rate, run["summary"]))
    return sorted(points, key=lambda p: p[0])


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return None
    return plt
