"""The dense linear of a decode step's few rows (op ``linear``, ``linear_triton``) under
candidate tiles, against cuBLAS (``F.linear``; for gate/up then ``silu_mul_triton``, the path
before the gated activation moved into the epilogue), at the dense projections of
DeepSeek-V2-Lite, DeepSeek-V3 and GPT-OSS:

    python -P -m pdserve.bench.linear_tiles [--budget-s 150] [--rows 1,8,16] [--models v2l,v3,oss]
        [--tiles 'BN,BK,warps,stages,swap;...'] [--out PATH]

Each timing is a CUDA graph of the op run over copies of the weight spanning 200 MB or more
(each copy twice, back to back: every read comes from memory, as in a decode step, and launch
overhead overlaps as it does there), divided by the calls: microseconds per call, and the
weight's bytes over it. Rows: the table's (and the JSON's) shape, rows, cuBLAS, every
candidate's time and relative error against float32, the best, its speed over cuBLAS's.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import time

import torch
import torch.nn.functional as F

# name -> (weight rows, reduction, gated): the projections a decode step runs through op linear
SHAPES = {
    "v2l": [("q+kv_a", 3648, 2048, False), ("o_proj", 2048, 2048, False),
            ("shared_gate_up", 5632, 2048, True), ("shared_down", 2048, 2816, False)],
    "v3": [("qkv_a", 2112, 7168, False), ("q_b", 24576, 1536, False),
           ("o_proj", 7168, 16384, False), ("shared_gate_up", 4096, 7168, True),
           ("shared_down", 7168, 2048, False)],
    "oss": [("qkv", 5120, 2880, False), ("o_proj", 2880, 4096, False)],
}  # fmt: skip
# (BLOCK_N, BLOCK_K, warps, stages, SWAP)
_TILES = ((16, 128), (16, 256), (32, 128), (32, 256), (64, 128))
CANDIDATES = [(bn, bk, w, st, 0) for (bn, bk), w, st in itertools.product(_TILES, (4, 8), (3, 4))]
CANDIDATES += [(bn, bk, 4, st, 1) for (bn, bk), st in itertools.product(_TILES, (3, 4))]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def us_cold(make, copies: int, reps: int = 3) -> float:
    """make(i) -> a call on weight copy i; a CUDA graph of every copy's call twice over,
    replayed ``reps`` times: the fastest replay's microseconds per call."""
    calls = [make(i) for i in range(copies)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()  # compile and warm up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            for call in calls * 2:
                call()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / (2 * len(calls)))
    return best


def time_shape(shape: str, n: int, k: int, gated: bool, token_rows, tiles) -> list[dict]:
    """One weight shape at each row count: cuBLAS and every candidate (rows of the table)."""
    from pdserve.kernels.linear_triton import linear_triton
    from pdserve.kernels.silu_mul_triton import silu_mul_triton

    act = silu_mul_triton if gated else None
    copies = max(4, -(-200_000_000 // (n * k * 2)))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    rows = []
    for t in token_rows:
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x.float(), ws[0].float())  # [T, N]
        if gated:
            want = F.silu(want[:, : n // 2]) * want[:, n // 2 :]

        def cublas(i, x=x):
            if gated:
                return lambda: silu_mul_triton(F.linear(x, ws[i]))
            return lambda: F.linear(x, ws[i])

        r = {"shape": shape, "n": n, "k": k, "gated": gated, "rows": t}
        r["cublas_us"], r["tiles"] = us_cold(cublas, copies), {}
        for bn, bk, warps, stages, swap in tiles:
            cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, SWAP=swap)
            got = linear_triton(x, ws[0], silu_mul=act, config=cfg)
            err = float((got.float() - want).norm() / want.norm())

            def ours(i, x=x, cfg=cfg):
                return lambda: linear_triton(x, ws[i], silu_mul=act, config=cfg)

            r["tiles"][f"{bn},{bk},{warps},{stages},{swap}"] = {
                "us": us_cold(ours, copies),
                "err": err,
            }
        best = min(r["tiles"], key=lambda c: r["tiles"][c]["us"])
        r["best"], r["best_us"] = best, r["tiles"][best]["us"]
        mb = n * k * 2 / 1e6
        print(f"{shape:18} T={t:2} {mb:6.1f} MB  cuBLAS {r['cublas_us']:6.1f} us "
              f"({mb / r['cublas_us']:4.2f} TB/s)  best {best:14} {r['best_us']:6.1f} us "
              f"({mb / r['best_us']:4.2f} TB/s)  x{r['cublas_us'] / r['best_us']:.2f}",
              flush=True)  # fmt: skip
        rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    from pdserve.bench.result_file import write_result

    p = argparse.ArgumentParser(prog="python -m pdserve.bench.linear_tiles", description=__doc__)
    p.add_argument("--budget-s", type=float, default=150.0, help="stop adding shapes after this")
    p.add_argument("--rows", type=_ints, default=(1, 8, 16), help="tokens, each <= 16")
    p.add_argument("--models", default="v2l,v3,oss", help=f"of {','.join(SHAPES)}")
    p.add_argument("--tiles", help="candidates 'BN,BK,warps,stages,swap;...' (default: all)")
    p.add_argument("--out", help="result JSON (default bench/results/linear-tiles-<gpu>.json)")
    args = p.parse_args(argv)
    models = args.models.split(",")
    try:
        tiles = [_ints(c) for c in args.tiles.split(";")] if args.tiles else CANDIDATES
    except ValueError:
        tiles = []
    if not tiles or any(len(c) != 5 for c in tiles):
        p.error(f"--tiles {args.tiles!r}: five numbers each, BN,BK,warps,stages,swap")
    if bad := sorted(set(models) - set(SHAPES)):
        p.error(f"--models {bad}: known are {sorted(SHAPES)}")
    if not all(0 < r <= 16 for r in args.rows):
        p.error(f"--rows {args.rows} must lie in [1, 16]")
    if not torch.cuda.is_available():
        raise SystemExit("the tile timings need a CUDA GPU")
    t0, gpu, rows = time.time(), torch.cuda.get_device_name(), []
    torch.manual_seed(0)
    for model, (name, n, k, gated) in ((m, s) for m in models for s in SHAPES[m]):
        if time.time() - t0 > args.budget_s:
            rows.append({"shape": f"{model}.{name}", "skipped": "time budget"})
            continue
        rows += time_shape(f"{model}.{name}", n, k, gated, args.rows, tiles)
    out = {"gpu": gpu, "date": datetime.date.today().isoformat(), "rows": rows}
    write_result(out, "linear-tiles", gpu, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
