"""moe_small's split-K and one-launch choices against each other and the peer, on one GPU:
``python -m pdserve.bench.moe_splits [--models A,B] [--m 1,2,4] [--splits 1,2,4,8] [--ahead N]
[--out PATH]``.

Split K: the whole MoE (fragment layout, the table's tiles at M = 2, which split nothing;
``--ahead N``: those tiles loaded N ahead into registers) for every (gate/up, down) pair of
split counts, per model and token count M, with triton_kernels
on the same inputs where it is on ``PYTHONPATH``. One launch: DeepSeek-V3 at M = 128 / 256 /
512 with at most 1024 (token, expert) slots per launch (the chunks each read every expert
again) against one launch of up to 8192, with 16-, 32- and 64-row token blocks, beside the
grouped GEMM and the peer. Times: CUDA-graph replays, L2 flushed (``bench.kernels.ms_graph``).
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import triton

from pdserve.bench import kernels
from pdserve.bench.kernels import MODELS, ceilings, moe_act, moe_case, time_peers
from pdserve.bench.moe_peers import Peers
from pdserve.bench.result_file import write_result
from pdserve.kernels import moe_triton_small_m, triton_configs
from pdserve.kernels.moe_triton_grouped import moe_grouped_triton
from pdserve.kernels.moe_triton_small_m import moe_small_triton

DEFAULT_MODELS = ("deepseek-v3", "deepseek-v2-lite", "gpt-oss-120b", "gpt-oss-20b")


def _slice(case: tuple, m: int) -> tuple:
    """The first m tokens of a (x, experts, ids, routing weights) case."""
    x, w, ids, tw = case
    return x[:m].contiguous(), w, ids[:m].contiguous(), tw[:m].contiguous()


def split_rows(models, ms, splits, peers: Peers, copy_gbps: float, ahead: int = 0) -> list[dict]:
    rows = []
    base = triton_configs.pick(triton_configs.MOE_SMALL_FRAGMENT, torch.device(kernels.DEV), 2)
    if ahead:  # the tiles loaded that many ahead into registers (``moe_k_loops``)
        base = {gemm: dict(c, AHEAD=ahead, num_stages=1) for gemm, c in base.items()}
    for model in models:
        act = moe_act(model)
        plain = moe_case(model, max(ms))
        fragment = plain[1].interleaved_copy()
        h, e, k, i = MODELS[model]
        for m in ms:
            x, w, ids, tw = _slice(plain, m)
            nbytes = ids.unique().numel() * w.expert_nbytes()
            times = {}
            for s1 in splits:
                for s2 in splits:
                    cfg = {
                        "gemm1": dict(base["gemm1"], SPLIT_K=s1),
                        "gemm2": dict(base["gemm2"], SPLIT_K=s2),
                    }
                    times[f"{s1},{s2}"] = kernels.ms_graph(
                        moe_small_triton, x, fragment, ids, tw, act, config=cfg, rep_ms=60
                    )
            one = times[f"{splits[0]},{splits[0]}"]
            peer = time_peers(peers, (x, w, ids, tw), act, moe_small_triton, one)
            best = min(times, key=times.get)
            a = min(m * k, e)  # programs per N tile: the active experts at most
            row = dict(
                model=model,
                M=m,
                times=times,
                best=best,
                peer_ms=peer["peers"].get("triton_kernels", {}).get("ms"),
                nbytes=nbytes,
                programs_gemm1=a * triton.cdiv(i, base["gemm1"]["BLOCK_N"]),
                programs_gemm2=a * triton.cdiv(h, base["gemm2"]["BLOCK_N"]),
            )
            rows.append(row)
            pct = 100 * nbytes / times[best] / 1e6 / copy_gbps
            order = sorted(times, key=times.get)[:4]
            print(
                f"{model:17s} M={m:4d} unsplit {one:.4f}  best {best} {times[best]:.4f}"
                f" ({pct:.0f}% copy)  peer {row['peer_ms']}  next: "
                + " ".join(f"{c} {times[c]:.4f}" for c in order[1:])
            )
        del plain, fragment
        torch.cuda.empty_cache()
    return rows


def launch_rows(peers: Peers) -> list[dict]:
    rows = []
    act = moe_act("deepseek-v3")
    plain = moe_case("deepseek-v3", 512)
    fragment = plain[1].interleaved_copy()
    base = triton_configs.pick(triton_configs.MOE_SMALL_FRAGMENT, torch.device(kernels.DEV), 2)
    default_slots = moe_triton_small_m.MAX_SLOTS
    try:
        for m in (128, 256, 512):
            x, w, ids, tw = _slice(plain, m)
            row = {"M": m}
            for slots in (1024, default_slots):
                moe_triton_small_m.MAX_SLOTS = slots
                for bm in (16, 32, 64):
                    cfg = {g: dict(base[g], BLOCK_M=bm) for g in ("gemm1", "gemm2")}
                    row[f"small_slots{slots}_bm{bm}"] = kernels.ms_graph(
                        moe_small_triton, x, fragment, ids, tw, act, config=cfg, rep_ms=60
                    )
            moe_triton_small_m.MAX_SLOTS = default_slots
            row["grouped"] = kernels.ms_graph(moe_grouped_triton, x, fragment, ids, tw, act)
            peer = time_peers(peers, (x, w, ids, tw), act, moe_grouped_triton, row["grouped"])
            row["peer"] = peer["peers"].get("triton_kernels", {}).get("ms")
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    finally:
        moe_triton_small_m.MAX_SLOTS = default_slots
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--m", default="1,2,4,8,16,32", help="token counts of the split sweep")
    ap.add_argument("--splits", default="1,2,4,8", help="split counts, the first unsplit")
    ap.add_argument("--no-launches", action="store_true", help="skip the one-launch part")
    ap.add_argument("--ahead", type=int, default=0, choices=(0, 1, 2),
                    help="the split sweep's tiles loaded N ahead into registers")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    models = args.models.split(",")
    if bad := sorted(set(models) - set(MODELS)):
        ap.error(f"unknown --models {bad}; known: {sorted(MODELS)}")
    t0 = time.time()
    gpu = torch.cuda.get_device_name()
    ceil = ceilings()
    print(f"{gpu}: copy {ceil['copy_GBps']:.0f} GB/s")
    peers = Peers()
    ms = tuple(int(v) for v in args.m.split(","))
    splits = tuple(int(v) for v in args.splits.split(","))
    out = {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "command": "python -m pdserve.bench.moe_splits "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)
        ),
        "ceilings": ceil,
        "peers_skipped": dict(peers.skipped),
        "rows": split_rows(models, ms, splits, peers, ceil["copy_GBps"], args.ahead),
        "large": [] if args.no_launches or "deepseek-v3" not in models else launch_rows(peers),
    }
    print(f"in {time.time() - t0:.0f} s")
    write_result(out, "moe-splits", gpu, args.out)


if __name__ == "__main__":
    main()
