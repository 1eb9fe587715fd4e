"""Where each KV hand-off's time goes, from the records a deployment wrote with
``PDSERVE_KV_TRACE=<folder>`` (``cluster/trace_file.py``): every phase of every transfer that
all four writers recorded (the decode replica, the prefill replica, and both KV peers), in ms
from the moment the decode replica had the prefill result, as median, mean and p90 over the
transfers, in the order of their medians; and the garbage collections the processes recorded,
marked where one overlapped a transfer. Writes JSON.

    PDSERVE_KV_TRACE=/tmp/kvtrace pdserve up -c deploy.yaml   # then load it, then
    python -m pdserve.bench.kv_trace /tmp/kvtrace --skip 8 --out bench/results/kv-trace.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SIDES = ("decode replica", "prefill replica", "prefill peer", "decode peer")
ORIGIN = ("decode replica", "answered")  # the axis' zero: the first token's reply at decode


def load(folder: str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """{transfer id: {side: {phase: perf_counter}}} from every record file in ``folder``; a
    transfer with two records from one side (fan-out to several decode ranks) keeps the first."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["tid"], {}).setdefault(r["side"], r["t"])
    return out


def gc_pauses(
    records: dict[str, dict[str, dict[str, float]]], skip: int = 0
) -> list[dict[str, float | int | bool]]:
    """The garbage collections the writers recorded (``trace_file.watch_gc``: side "gc"), by
    start: {"pid", "generation", "ms", "in_transfer"}, the last True when the pause overlaps a
    complete transfer (after the first ``skip``) between the decode replica's call and its KV
    landing."""
    decode = [r["decode replica"] for r in _complete(records)[skip:]]
    windows = [(d["called"], d.get("landed", d["called"])) for d in decode]
    out = []
    for tid, r in records.items():
        if "gc" not in r:
            continue
        gen, pid = tid.split("/")[:2]
        start, stop = r["gc"]["start"], r["gc"]["stop"]
        out.append({"pid": int(pid), "generation": int(gen.removeprefix("gc")), "start": start,
                    "ms": 1e3 * (stop - start),
                    "in_transfer": any(a < stop and start < b for a, b in windows)})  # fmt: skip
    return sorted(out, key=lambda g: g["start"])


def _complete(records: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, dict[str, float]]]:
    """The transfers every writer recorded, in the order the decode replica called prefill."""
    complete = [r for r in records.values() if all(s in r for s in SIDES)]
    return sorted(complete, key=lambda r: r["decode replica"]["called"])


def timelines(
    records: dict[str, dict[str, dict[str, float]]], skip: int = 0
) -> list[dict[str, float]]:
    """Per complete transfer, in the order the decode replica called prefill, after the first
    ``skip`` (a warm-up): {"side: phase": ms after the decode replica had the result}."""
    rows = []
    for r in _complete(records)[skip:]:
        zero = r[ORIGIN[0]][ORIGIN[1]]
        rows.append({f"{s}: {p}": 1e3 * (t - zero) for s in SIDES for p, t in r[s].items()})
    return rows


def summary(rows: list[dict[str, float]]) -> list[dict]:
    """[{"phase", "median_ms", "mean_ms", "p90_ms", "count"}], by median."""
    out = []
    for phase in sorted({p for r in rows for p in r}):
        v = sorted(r[phase] for r in rows if phase in r)
        out.append({"phase": phase, "median_ms": statistics.median(v),
                    "mean_ms": statistics.fmean(v), "p90_ms": v[min(len(v) - 1, int(0.9 * len(v)))],
                    "count": len(v)})  # fmt: skip
    return sorted(out, key=lambda x: x["median_ms"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.kv_trace", description=__doc__)
    p.add_argument("folder", help="the PDSERVE_KV_TRACE folder")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N transfers")
    p.add_argument("--out", help="JSON path (default: print only)")
    args = p.parse_args(argv)
    records = load(args.folder)
    rows = timelines(records, args.skip)
    if not rows:
        print(f"no transfer in {args.folder} has records from all of: {', '.join(SIDES)}")
        return 1
    table = summary(rows)
    print(f"{len(rows)} transfers; ms from the decode replica having the prefill result")
    print(f"{'phase':<36} {'median':>9} {'mean':>9} {'p90':>9}")
    for r in table:
        print(f"{r['phase']:<36} {r['median_ms']:9.3f} {r['mean_ms']:9.3f} {r['p90_ms']:9.3f}")
    pauses = gc_pauses(records, args.skip)
    if pauses:
        during = [g for g in pauses if g["in_transfer"]]
        longest = max(pauses, key=lambda g: g["ms"])
        print(f"{len(pauses)} garbage collections held a process 1 ms or more (longest "
              f"{longest['ms']:.1f} ms, generation {longest['generation']}); {len(during)} "
              "during a transfer"
              + (f", longest {max(g['ms'] for g in during):.1f} ms" if during else ""))  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result = {"summary": table, "transfers": rows, "gc_pauses": pauses}
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
