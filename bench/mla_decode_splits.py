"""The Triton MLA decode's split count (``split_count``) for one or two resident programs per
SM, beside FlashInfer's fa3 and fa2, with the shipped tiles:

    python -P -m pdserve.bench.mla_decode_splits [--heads 16,128] [--batches 8,32,64,128]
        [--contexts 1024,4096] [--table-tokens N] [--budget-s 300] [--out PATH]

Per point: ms (CUDA-graph replays, L2 flushed) and the split count at ``per_sm`` 1 and 2 (one
wave of programs either way), which of them the kernel picks (``programs_per_sm``, from the
tiles' shared memory), and the peers' ms. ``--table-tokens``: block tables as wide as N tokens
(a decode graph's are as wide as ``max_model_len``); the split count follows the width.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from pdserve.bench.mla_decode_tiles import check_grid, grid_points, numbers


def main(argv: list[str] | None = None) -> int:
    from pdserve.bench.kernels import mla_case, mla_peers, ms_graph
    from pdserve.bench.result_file import write_result
    from pdserve.kernels import triton_configs
    from pdserve.kernels.device import sm_count
    from pdserve.kernels.mla_decode_triton import mla_decode_triton, programs_per_sm, split_count

    prog = "python -m pdserve.bench.mla_decode_splits"
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    ints = numbers(int)
    p.add_argument("--heads", type=ints, default=(16, 128))
    p.add_argument("--batches", type=ints, default=(8, 32, 64, 128))
    p.add_argument("--contexts", type=ints, default=(1024, 4096), help="<= 32768 each")
    p.add_argument("--table-tokens", type=int, default=0, help="block tables this wide (<= 32768)")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop adding points after this")
    p.add_argument("--out", help="result JSON (default bench/results/mla-decode-splits-<gpu>.json)")
    args = p.parse_args(argv)
    check_grid(p, args)
    t0, gpu, dev = time.time(), torch.cuda.get_device_name(), torch.device("cuda")
    most = max(b * max(args.contexts, default=0) for b in args.batches) // 64
    cache = torch.empty(max(most, args.table_tokens // 64 * max(args.batches)), 64, 576,
                        dtype=torch.bfloat16, device=dev).normal_()  # fmt: skip
    print(" heads    B    ctx  picked  per_sm 1: splits ms  per_sm 2: splits ms   fa3 ms   fa2 ms")
    rows: list[dict] = []
    for heads, b, ctx in grid_points(args, t0, rows):
        q, table, lens = mla_case(heads, b, ctx, cache, args.table_tokens)
        cfg = triton_configs.mla_decode_config(triton_configs.device_keys(dev), heads)
        call = (q, cache, table, lens, 0.07, 512)
        ref = mla_decode_triton(*call)  # [B, H, 512]
        r: dict = {"heads": heads, "B": b, "ctx": ctx, "config": cfg,
                   "picked": programs_per_sm(cfg, 576, 2, dev)}  # fmt: skip
        for per_sm in (1, 2):
            splits = split_count(b, -(-heads // cfg["BLOCK_H"]), table.shape[1] * 64,
                                 cfg["BLOCK_N"], sm_count(dev), per_sm, True)  # fmt: skip
            got = mla_decode_triton(*call, num_splits=splits)
            r[f"per_sm_{per_sm}"] = {
                "splits": splits,
                "ms": ms_graph(mla_decode_triton, *call, num_splits=splits),
                "err": float((got.float() - ref.float()).norm() / ref.float().norm()),
            }
        peers = mla_peers(q, cache, table, lens, ref, 1.0)["peers"]
        r["fa3"] = peers["flashinfer_fa3"].get("ms")
        r["fa2"] = peers["flashinfer_fa2"].get("ms")
        one, two = r["per_sm_1"], r["per_sm_2"]
        fa = " ".join(f"{v:8.4f}" if v else f"{'-':>8}" for v in (r["fa3"], r["fa2"]))
        print(f"{heads:6} {b:4} {ctx:6} {r['picked']:7} {one['splits']:15} {one['ms']:7.4f}"
              f" {two['splits']:15} {two['ms']:7.4f} {fa}", flush=True)  # fmt: skip
        rows.append(r)
    out = {"gpu": gpu, "date": datetime.date.today().isoformat(), "rows": rows,
           "table_tokens": args.table_tokens or "the context"}  # fmt: skip
    write_result(out, "mla-decode-splits", gpu, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
