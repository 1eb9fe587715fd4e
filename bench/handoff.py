"""Where disaggregated requests' handoff time goes, from a running deployment's /metrics.

Reads ``pdserve_handoff_seconds`` (the decode pool's phases of each disaggregated request: the
prefill call, and within it the hop to the prefill replica, the replica's own share and the hop
back, which end at the first token; then the KV after the result and joining the decode batch)
and both pools' TTFT histograms, and prints each as a mean over the requests since a baseline
saved with ``--save`` (or since the deployment started). Writes JSON.

    python -m pdserve.bench.handoff --save /tmp/base.txt   # then load it, e.g. pdserve bench ...
    python -m pdserve.bench.handoff --since /tmp/base.txt --out bench/results/handoff.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.request
from pathlib import Path

_SAMPLE = re.compile(r"^pdserve_(\w+?)_(sum|count)\{([^}]*)\} (\S+)$")
_WANTED = ("handoff_seconds", "time_to_first_token_seconds")


def _sums(metrics: str) -> dict[tuple[str, str], dict[str, float]]:
    acc: dict[tuple[str, str], dict[str, float]] = {}
    for line in metrics.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in _WANTED:
            acc.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = float(m.group(4))
    return acc


def means(metrics: str, baseline: str = "") -> list[dict]:
    """[{"metric", "labels", "mean_ms", "count"}] for the handoff phases and the TTFTs, over
    the requests counted since ``baseline`` (an earlier /metrics text of the same deployment)."""
    before = _sums(baseline)
    rows = []
    for key, v in _sums(metrics).items():
        b = before.get(key, {})
        count = v.get("count", 0) - b.get("count", 0)
        if count > 0:
            total = v.get("sum", 0.0) - b.get("sum", 0.0)
            rows.append({"metric": key[0], "labels": key[1], "mean_ms": 1e3 * total / count,
                         "count": int(count)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.handoff", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--out", help="JSON path (default: print only)")
    p.add_argument("--save", help="keep this /metrics text as the baseline of a later run")
    p.add_argument("--since", help="count only requests after this saved baseline")
    args = p.parse_args(argv)
    with urllib.request.urlopen(f"{args.url}/metrics", timeout=10) as r:
        text = r.read().decode()
    if args.save:
        Path(args.save).write_text(text)
        print(f"saved the baseline to {args.save}")
        return 0
    rows = means(text, Path(args.since).read_text() if args.since else "")
    if not any(r["metric"] == "handoff_seconds" for r in rows):
        print("no disaggregated request finished yet (or the deployment is colocated)")
    for r in rows:
        print(f"{r['metric']:28} {r['labels']:42} {r['mean_ms']:9.2f} ms  ({r['count']} requests)")
    if args.out:
        out = {"url": args.url, "date": time.strftime("%Y-%m-%d"), "means": rows}
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
