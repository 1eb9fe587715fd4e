"""GQA decode attention with sinks (GPT-OSS) on one GPU: ours against FlashInfer's and PyTorch,
on the same inputs, beside the copy ceiling measured in the same run:
``python -P -m pdserve.bench.gqa_attention [--json PATH]``.

GPT-OSS's shapes (64 query heads, 8 KV heads of 64, bf16, pages of 64) at batch 1-128 and
contexts of 1k-32k, full layers and sliding ones (a 128-token window). GB/s = the KV the step
must read (a sliding layer's window at most), the queries and the outputs, over the time.
Every backend's output is checked against the PyTorch reference first (``max_err``); a backend
that cannot run here (FlashInfer not installed, or refusing sinks) is listed with the reason.
Times: CUDA-graph replays, the L2 flushed before each (``bench.kernels.ms_graph``).
"""

from __future__ import annotations

import argparse
import datetime
import time
from functools import partial
from pathlib import Path

import torch

HEADS, KV_HEADS, HEAD_DIM, PAGE, WINDOW = 64, 8, 64, 64, 128
GRID = [(b, c) for b in (1, 8, 32, 128) for c in (1024, 4096, 32768)]


def case(b: int, ctx: int, dev: str, heads: int = HEADS, kv_heads: int = KV_HEADS,
         d: int = HEAD_DIM, page: int = PAGE, seed: int = 0):  # fmt: skip
    """(q [B, H, D], cache [N, page, KVH * 2 * D], block table, lengths, sinks [H] float32):
    each sequence's pages in a random order, as a serving cache holds them."""
    g = torch.Generator(device=dev).manual_seed(seed)
    blocks = -(-ctx // page)
    n = b * blocks
    cache = torch.randn(n, page, kv_heads * 2 * d, device=dev, generator=g).bfloat16()
    table = torch.randperm(n, device=dev, generator=g).view(b, blocks).int()
    lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(b, heads, d, device=dev, generator=g).bfloat16()
    sinks = torch.randn(heads, device=dev, generator=g)
    return q, cache, table, lens, sinks


class FlashInferDecode:
    """FlashInfer's paged decode, planned once for a case: K and V as separate [N, page, KVH,
    D] caches (its NHD layout) holding the same values as ours."""

    def __init__(self, q, cache, table, lens, sinks, scale: float, window: int) -> None:
        import flashinfer  # a peer: benchmarks only

        b, h, d = q.shape
        n, page, width = cache.shape
        kv = cache.view(n, page, width // (2 * d), 2, d)
        self.k, self.v = kv[..., 0, :].contiguous(), kv[..., 1, :].contiguous()
        ws = torch.empty(128 << 20, dtype=torch.uint8, device=q.device)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws, "NHD", use_tensor_cores=True
        )
        blocks = table.shape[1]
        indptr = torch.arange(b + 1, dtype=torch.int32, device=q.device) * blocks
        last = (lens - 1) % page + 1
        self.wrapper.plan(
            indptr, table.flatten(), last, h, width // (2 * d), d, page,
            pos_encoding_mode="NONE", window_left=window - 1 if window else -1,
            q_data_type=q.dtype, kv_data_type=cache.dtype, sm_scale=scale,
        )  # fmt: skip
        self.sinks = sinks

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return self.wrapper.run(q, (self.k, self.v), sinks=self.sinks)


def run(grid, dev: str, budget_s: float, windows=(0, WINDOW), shape: dict | None = None,
        timer=None) -> list[dict]:  # fmt: skip
    """One row per (batch, context, window): each backend's ms, GB/s and error."""
    from pdserve.bench.kernels import ms_graph
    from pdserve.kernels.gqa_decode_triton import gqa_decode_triton
    from pdserve.kernels.gqa_reference import gqa_decode_torch

    timer = timer or ms_graph
    shape = shape or {}
    rows, t0 = [], time.time()
    for b, ctx in grid:
        q, cache, table, lens, sinks = case(b, ctx, dev, **shape)
        d = q.shape[2]
        scale = d**-0.5
        for window in windows:
            row: dict = {"B": b, "ctx": ctx, "window": window}
            rows.append(row)
            if time.time() - t0 > budget_s:
                row["skipped"] = "time budget"
                continue
            seen = min(ctx, window) if window else ctx
            nbytes = b * seen * cache.shape[2] * 2 + 2 * q.numel() * 2
            ref = gqa_decode_torch(q, cache, table, lens, sinks, scale, window).float()
            args = (cache, table, lens, sinks, scale, window)
            backends = {
                "ours": partial(_bound, gqa_decode_triton, args),
                "flashinfer": partial(FlashInferDecode, q, *args),
                "torch": partial(_bound, gqa_decode_torch, args),
            }
            for name, make in backends.items():
                try:
                    fn = make()
                    err = float((fn(q).float() - ref).abs().max())
                    t = timer(fn, q) if name != "torch" else _eager_ms(fn, q, dev)
                except Exception as e:  # a peer that cannot run here: say why
                    row[name] = {"unavailable": f"{type(e).__name__}: {e}"[:200]}
                    continue
                row[name] = {"ms": t, "GBps": nbytes / t / 1e6, "max_err": err}
            peer = row.get("flashinfer", {}).get("ms")
            if peer and "ms" in row.get("ours", {}):
                row["ours_over_peer_speed"] = peer / row["ours"]["ms"]
    return rows


def _bound(fn, args: tuple):
    """``fn`` of a query alone, the rest of its arguments fixed."""
    return lambda q: fn(q, *args)


def _eager_ms(fn, q, dev: str) -> float:
    """The PyTorch reference syncs the host: timed eagerly, a median of a few."""
    times = []
    for _ in range(5):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(q)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[2]


def report(rows: list[dict], copy_gbps: float) -> None:
    print(f"{'B':>4} {'ctx':>6} {'win':>4} {'ours ms':>8} {'%copy':>6} {'flashinfer':>10} "
          f"{'%copy':>6} {'ours/peer':>9} {'torch ms':>9}")  # fmt: skip
    for r in rows:
        if "skipped" in r:
            continue
        o, f, t = r.get("ours", {}), r.get("flashinfer", {}), r.get("torch", {})

        def cell(x: dict, key: str, fmt: str) -> str:
            return format(x[key], fmt) if key in x else "-"

        pct = {k: 100 * x["GBps"] / copy_gbps for k, x in (("o", o), ("f", f)) if "GBps" in x}
        print(f"{r['B']:>4} {r['ctx']:>6} {r['window']:>4} {cell(o, 'ms', '.3f'):>8} "
              f"{pct.get('o', 0):>6.0f} {cell(f, 'ms', '.3f'):>10} {pct.get('f', 0):>6.0f} "
              f"{r.get('ours_over_peer_speed', 0):>9.2f} {cell(t, 'ms', '.2f'):>9}")  # fmt: skip
    why = {r["flashinfer"]["unavailable"] for r in rows if "unavailable" in r.get("flashinfer", {})}
    for w in sorted(why):
        print(f"flashinfer unavailable: {w}")


def main() -> None:
    from pdserve.bench.kernels import ceilings
    from pdserve.bench.mla_decode_tiles import numbers
    from pdserve.bench.result_file import write_result
    from pdserve.kernels import triton_configs

    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop adding points after this")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--tiles", type=numbers(int), default=(), metavar="N,W,S",
        help="our decode's BLOCK_N, warps, stages",
    )  # fmt: skip
    args = ap.parse_args()
    if args.tiles:  # the decode reads this dict at each call
        if len(args.tiles) != 3:
            ap.error(f"--tiles {args.tiles} must be BLOCK_N,warps,stages")
        triton_configs.GQA_DECODE.update(zip(("BLOCK_N", "num_warps", "num_stages"), args.tiles))
    gpu = torch.cuda.get_device_name()
    out = {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "command": "python -P -m pdserve.bench.gqa_attention",
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "page": PAGE},
        "decode_tiles": dict(triton_configs.GQA_DECODE),
        "ceilings": ceilings(),
    }
    copy = out["ceilings"]["copy_GBps"]
    print(f"{gpu}: copy {copy:.0f} GB/s")
    out["decode"] = run(GRID, "cuda", args.budget_s)
    report(out["decode"], copy)
    write_result(out, "gqa-attention", gpu, args.json)


if __name__ == "__main__":
    main()
