"""The Triton MLA decode under candidate tiles, beside FlashInfer's fa3 and fa2, over the MLA
grid of ``bench.kernels`` (16 and 128 heads; 1-128 sequences of 1k-32k tokens):

    python -P -m pdserve.bench.mla_decode_tiles [--budget-s 400] [--table-tokens N] [--out PATH]
        [--heads 16,128] [--batches 1,8,32,128] [--contexts 1024,4096,32768] [--split-factors 1]

``--table-tokens``: block tables as wide as N tokens whatever the context, as a decode graph's
are (as wide as ``max_model_len``); the split count follows the width (default: the context).

Per point and candidate (BLOCK_H, BLOCK_N, warps, stages): ms (CUDA-graph replays, L2 flushed),
relative error against the kernel's own default, and whether its shared memory fits an SM120
block (99 KB, ``mla_decode_smem``); the peers' ms. Rows store each candidate under
``new(<tiles>)``: the kernel as it is (``bench/results/mla-decode-configs-H100.json`` also holds
``old(<tiles>)`` rows, the same tiles under the grid order before head blocks varied fastest).
``--split-factors 0.5,1,2``: each candidate also with half and twice the kernel's split count
(``split_count`` at the candidate's ``programs_per_sm``, rounded, at least 1), stored as
``new(<tiles>)x<factor>`` with the count used.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable, Iterator
from itertools import product

import torch

# (BLOCK_H, BLOCK_N, warps, stages); each fits an H100's or H200's 227 KiB a block. Under 64
# heads a tile of s stages holds s - 1 KV buffers, at 64 heads s (``mla_decode_smem``). At 128
# heads the 32-head tiles of 16 tokens hold two or three KV buffers within SM120's 99 KiB (74,752
# and 93,184 B compiled for sm_90), where (32, 32, 8, 2) holds one.
CANDIDATES = {
    128: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (32, 64, 8, 2), (32, 64, 8, 3),
          (32, 32, 8, 3), (32, 32, 8, 2), (16, 32, 4, 3), (32, 16, 8, 3), (32, 16, 8, 4),
          (32, 16, 4, 3)],
    16: [(16, 128, 8, 2), (16, 32, 4, 2), (16, 32, 4, 3), (16, 32, 8, 3), (16, 32, 4, 4),
         (16, 32, 8, 4), (16, 64, 4, 3), (16, 64, 8, 3), (16, 64, 4, 2), (16, 16, 4, 4)],
}  # fmt: skip


CACHE_BLOCKS = 128 * 32768 // 64  # 128 sequences of 32k: 4.8 GB


def numbers(kind: type) -> Callable[[str], tuple]:
    """An argparse type: comma-separated numbers of ``kind``."""
    return lambda text: tuple(kind(v) for v in text.split(","))


def check_grid(p: argparse.ArgumentParser, args: argparse.Namespace, blocks: int = 0) -> None:
    """--contexts (whole 64-token blocks) and --table-tokens within [64, 32768], and with
    ``blocks`` the largest batch's tables within a cache of that many blocks; a CUDA GPU to
    time on."""
    if max(args.contexts) > 32768 or min(args.contexts) < 64 or any(c % 64 for c in args.contexts):
        p.error(f"--contexts {args.contexts} must be multiples of 64 in [64, 32768] (the cache's "
                "blocks)")  # fmt: skip
    if not 0 <= args.table_tokens <= 32768:
        p.error(f"--table-tokens {args.table_tokens} is outside [0, 32768] (the cache's blocks)")
    need = max(args.batches) * max(*args.contexts, args.table_tokens) // 64
    if blocks and need > blocks:
        p.error(f"--batches {args.batches} of up to {need // max(args.batches)} blocks each need "
                f"{need} blocks, more than the cache's {blocks}")  # fmt: skip
    if not torch.cuda.is_available():
        raise SystemExit("the MLA decode timings need a CUDA GPU")


def grid_points(args: argparse.Namespace, t0: float, rows: list[dict]) -> Iterator[tuple]:
    """(heads, B, ctx) of the grid in order; once --budget-s has passed since ``t0``, each
    point left goes into ``rows`` as skipped instead."""
    for heads, b, ctx in product(args.heads, args.batches, args.contexts):
        if time.time() - t0 > args.budget_s:
            rows.append({"heads": heads, "B": b, "ctx": ctx, "skipped": "time budget"})
            continue
        yield heads, b, ctx


def main(argv: list[str] | None = None) -> int:
    from pdserve.bench.kernels import mla_case, mla_peers, ms_graph
    from pdserve.bench.result_file import write_result
    from pdserve.kernels.device import sm_count
    from pdserve.kernels.mla_decode_triton import mla_decode_triton, programs_per_sm, split_count
    from pdserve.kernels.triton_configs import mla_decode_smem

    prog = "python -m pdserve.bench.mla_decode_tiles"
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--budget-s", type=float, default=400.0, help="stop adding points after this")
    p.add_argument("--table-tokens", type=int, default=0, help="block tables this wide (<= 32768)")
    p.add_argument("--out", help="result JSON (default bench/results/mla-decode-tiles-<gpu>.json)")
    ints, floats = numbers(int), numbers(float)
    p.add_argument("--heads", type=ints, default=(128, 16), help="of 16, 128")
    p.add_argument("--batches", type=ints, default=(1, 8, 32, 128))
    p.add_argument("--contexts", type=ints, default=(1024, 4096, 32768), help="<= 32768 each")
    p.add_argument("--split-factors", type=floats, default=(1.0,), help="x the kernel's splits")
    args = p.parse_args(argv)
    if bad := sorted(set(args.heads) - set(CANDIDATES)):
        p.error(f"--heads {bad}: candidates exist for {sorted(CANDIDATES)}")
    check_grid(p, args, CACHE_BLOCKS)
    t0, gpu = time.time(), torch.cuda.get_device_name()
    cache = torch.empty(CACHE_BLOCKS, 64, 576, dtype=torch.bfloat16, device="cuda").normal_()
    rows: list[dict] = []
    for heads, b, ctx in grid_points(args, t0, rows):
        q, table, lens = mla_case(heads, b, ctx, cache, args.table_tokens)
        ref = mla_decode_triton(q, cache, table, lens, 0.07, 512)  # [B, H, 512]
        r: dict = {"heads": heads, "B": b, "ctx": ctx, "t": {}}
        for c, factor in ((c, f) for c in CANDIDATES[heads] for f in args.split_factors):
            cfg = dict(BLOCK_H=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])
            per_sm = programs_per_sm(cfg, 576, 2, q.device)
            base = split_count(b, -(-heads // c[0]), table.shape[1] * 64, c[1],
                               sm_count(q.device), per_sm, True)  # fmt: skip
            splits = max(1, round(factor * base))
            call = (q, cache, table, lens, 0.07, 512)
            got = mla_decode_triton(*call, config=cfg, num_splits=splits)
            r["t"][f"new{c}" if factor == 1 else f"new{c}x{factor:g}"] = {
                "ms": ms_graph(mla_decode_triton, *call, config=cfg, num_splits=splits),
                "err": float((got.float() - ref.float()).norm() / ref.float().norm()),
                "fits99": mla_decode_smem(cfg, 576) <= 99 * 1024,
                "splits": splits,
            }
        peers = mla_peers(q, cache, table, lens, ref, 1.0)["peers"]
        r["fa2"] = peers["flashinfer_fa2"].get("ms")
        r["fa3"] = peers["flashinfer_fa3"].get("ms")
        best = min(r["t"], key=lambda k: r["t"][k]["ms"])
        print(f"H={heads:3} B={b:3} ctx={ctx:5} fa2 {r['fa2']} fa3 {r['fa3']} "
              f"best {best} {r['t'][best]['ms']:.3f} ms", flush=True)  # fmt: skip
        rows.append(r)
    out = {"gpu": gpu, "date": datetime.date.today().isoformat(), "rows": rows}
    out["table_tokens"] = args.table_tokens or "the context"
    write_result(out, "mla-decode-tiles", gpu, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
