"""Kernel benchmarks on one GPU, each figure beside a plain PyTorch baseline and the ceilings
measured in the same run:
``python -m pdserve.bench.kernels [--sweep] [--budget-s S] [--json PATH]``.

Ceilings: a 1 GiB device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul.
MoE decode (moe_small): GB/s = bytes of the distinct experts hit / time; "interleaved ms": the
same kernel on experts in the fragment layout (``mxfp4.interleave_mxfp4``, the
``triton_interleaved`` backends). MoE prefill
(moe_large): TFLOP/s = 6 * valid slots * H * I / time. MLA decode: GB/s of KV read and TFLOP/s of
2 * B * H * ctx * (D + v_dim). Times: triton.testing.do_bench medians (warm-up 25 ms, 100 ms of
repeats, L2 flushed before each). MoE rows carry the peers of ``bench/moe_peers.py`` that can
run here (FlashInfer's CUTLASS MoE), checked against ours on the same inputs, then timed; MLA rows
FlashInfer's MLA decode (fa3 and fa2, planned once, graph replays) where FlashInfer and nvcc
are installed; "ours / peer" over 1 means ours is faster. ``--sweep`` first times candidate tile
configs and uses the winners; paste the printed tables into kernels/triton_configs.py under the
GPU's name. Each candidate is timed against the tiles before it (the table's, or the
gate/up winner's for down's candidates), the two graphs' replays interleaved
(``graph_replays``), and replaces them only when faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from pdserve.bench.graph_replays import ms_graphs
from pdserve.bench.moe_peers import Peers
from pdserve.bench.result_file import write_result
from pdserve.kernels import KernelSet, triton_configs
from pdserve.kernels.device import DeviceInfo
from pdserve.kernels.mla_decode_triton import mla_decode_triton
from pdserve.kernels.moe_reference import MoeWeights, SwiGLU, moe_mxfp4_torch
from pdserve.kernels.moe_triton_grouped import moe_grouped_triton
from pdserve.kernels.moe_triton_small_m import moe_small_triton

DEV = "cuda"  # the smoke test of this script swaps in "cpu" (interpreter)
MODELS = {  # name: (hidden, experts, top_k, intermediate)
    "deepseek-v3": (7168, 256, 8, 2048),
    "deepseek-v2-lite": (2048, 64, 6, 1408),
    "gpt-oss-20b": (2880, 32, 4, 2880),  # biases, GPT-OSS's clamped SwiGLU
    "gpt-oss-120b": (2880, 128, 4, 2880),
}
GPT_OSS_ACT = SwiGLU(alpha=1.702, beta=1.0, limit=7.0)
PARTS = ("moe_decode", "moe_crossover", "moe_prefill", "mla_decode")
DECODE_M = (1, 4, 16, 64, 128, 256)
PREFILL_M = (512, 1024, 2048, 4096, 8192, 16384)
CROSS_M = (1, 4, 16, 32, 64, 128, 256, 512, 768, 832, 896, 960, 1024)
MLA_GRID = [(h, b, c) for h in (16, 128) for b in (1, 8, 32, 128) for c in (1024, 4096, 32768)]

# (BLOCK_N, BLOCK_K, warps, stages, SWAP) per GEMM of moe_small; BLOCK_M stays 16. SWAP 1: the
# weights as the MMA's left operand (``mma_xw``); on an H100 at DeepSeek-V3 shapes it ran 0.7-0.9x
# the speed of the same tiles unswapped (2026-12-05), so only two swapped candidates are tried.
SWEEP_SMALL = {
    "gemm1": [
        (32, 128, 4, 3, 0),
        (64, 128, 4, 3, 0),
        (64, 128, 8, 3, 0),
        (128, 128, 4, 3, 0),
        (128, 128, 8, 3, 0),
        (64, 256, 4, 3, 0),
        (64, 128, 4, 4, 0),
        (64, 128, 4, 3, 1),
        (128, 128, 4, 3, 1),
    ],
    "gemm2": [
        (64, 128, 4, 3, 0),
        (128, 128, 4, 3, 0),
        (128, 128, 8, 3, 0),
        (256, 128, 8, 3, 0),
        (128, 256, 8, 3, 0),
        (64, 256, 4, 3, 0),
        (128, 128, 4, 4, 0),
        (64, 128, 4, 3, 1),
        (128, 128, 4, 3, 1),
    ],
}
# The same for experts in the fragment layout (the weights are the wgmma's left operand, so
# BLOCK_N is a multiple of 64 per warpgroup and BLOCK_K of 64; SWAP is implied).
_FRAGMENT_TILES = [
    (64, 64, 4, 3, 0),
    (64, 64, 4, 4, 0),
    (64, 64, 4, 5, 0),
    (64, 64, 4, 6, 0),
    (64, 128, 4, 3, 0),
    (64, 128, 4, 4, 0),
    (128, 64, 8, 4, 0),
    (128, 128, 4, 3, 0),
]
# the down projection also on two warpgroups of 128 rows: the loop's fixed work spread over
# twice the codes per thread (sm_90: 3.75 instructions per weight element at 128 registers,
# against 5.16 for 64 x 64), yet 0.90-0.94x the speed of 64 x 64 on an H100 at M = 1-128. One
# warpgroup of 128 rows, as the gate/up GEMM's 64 + 64 (3.77 at 126 registers), ran the whole
# MoE 3-5% slower than the best 64 x 64 at 16 and 256 tokens (DeepSeek-V3) and 16 and 64
# (V2-Lite), and between 64 x 64's stage counts at 64 (DeepSeek-V3) (H100, 2026-12-07,
# BENCHMARKS.md), so it is no candidate.
# With a sixth number, AHEAD (``moe_k_loops``): the tiles loaded that many ahead into
# registers, no shared-memory stages for the weights (Triton 3.6's sm_90 compiles at 64 x 64:
# 3.36-3.62 SASS instructions per weight element in gate/up against the entry's 3.98, 3.84-4.03
# in down against 5.12; BENCHMARKS.md). First in the sweep, which stops at its deadline, then
# the wide tiles below.
_AHEAD_TILES = [
    (64, 64, 4, 1, 0, 1),
    (64, 64, 4, 1, 0, 2),
    (64, 128, 4, 1, 0, 1),
    (128, 64, 8, 1, 0, 1),
    (128, 64, 8, 1, 0, 2),
]
# Wide tiles, as triton_kernels' on Hopper (256 weight rows x 128 deep, 8 warps, 4 stages: 16 KB
# of codes a stage where ours take 2-4 KB; its opt_flags_nvidia.py): gate/up 128 + 128 rows,
# down 256 (sm_90 compiles: 163-165 and 179-200 registers, 3.45 and 3.3 SASS per element).
_WIDE_TILES = {
    "gemm1": [(128, 128, 8, 4, 0), (128, 128, 8, 3, 0)],
    "gemm2": [(256, 128, 8, 4, 0), (256, 128, 8, 3, 0), (128, 128, 8, 4, 0)],
}
# With a seventh number, maxnreg: registers capped so one more program fits an SM, where
# ptxas then keeps the K loop free of spills (sm_90 compiles, Triton 3.6): the table's 64 x 64
# entries at 96 and 80 (gate/up, 118 uncapped: 4 -> 5 and 6 programs) and 64 (down, 72: 7 -> 8),
# AHEAD 1 likewise, and the wide tiles at 128 (163 and 200: 1 -> 2).
_CAPPED_TILES = {
    "gemm1": [(64, 64, 4, 4, 0, 0, 96), (64, 64, 4, 4, 0, 0, 80), (64, 64, 4, 1, 0, 1, 96),
              (128, 128, 8, 4, 0, 0, 128)],
    "gemm2": [(64, 64, 4, 4, 0, 0, 64), (64, 64, 4, 1, 0, 1, 64), (256, 128, 8, 4, 0, 0, 128)],
}  # fmt: skip
SWEEP_FRAGMENT = {
    "gemm1": _AHEAD_TILES + _WIDE_TILES["gemm1"] + _CAPPED_TILES["gemm1"] + _FRAGMENT_TILES,
    "gemm2": _AHEAD_TILES
    + _WIDE_TILES["gemm2"]
    + _CAPPED_TILES["gemm2"]
    + _FRAGMENT_TILES
    + [(256, 64, 8, 4, 0)],
}
# (M timed, bucket its winners fill) per moe_small table: the tables' buckets; the token block
# and split count stay the entry's
SWEEP_SMALL_POINTS = {
    "MOE_SMALL_FRAGMENT": ((1, 1), (16, 256), (512, 1 << 30)),
    "MOE_SMALL": ((1, 4), (16, 16), (128, 1 << 30)),
}
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of moe_large, both GEMMs, GROUP_M 8
SWEEP_LARGE = [
    (64, 64, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (128, 64, 64, 4, 3),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (256, 64, 64, 8, 3),
    (128, 64, 64, 8, 3),
    # on the fragment layout the accumulators are [BLOCK_N, BLOCK_M] per gate and up: 8 warps
    # halve their registers per thread (134-142 against 242 at 4 warps, sm_90 compiles)
    (128, 64, 64, 8, 4),
    (64, 128, 64, 8, 3),
]
# (BLOCK_H, BLOCK_N, warps, stages) of mla_decode, per head count
SWEEP_MLA = {
    16: [(16, 32, 4, 4), (16, 32, 4, 3), (16, 16, 4, 4), (16, 64, 8, 3), (16, 64, 4, 3),
         (16, 128, 8, 2)],
    128: [(64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 8, 2), (32, 64, 8, 3), (32, 32, 8, 3)],
}  # fmt: skip


def ms(fn, *args, **kwargs) -> float:
    """Median milliseconds of eager fn(*args, **kwargs) (the PyTorch baselines sync the host)."""
    return do_bench(partial(fn, *args, **kwargs), warmup=25, rep=100, return_mode="median")


def ms_graph(fn, *args, rep_ms: float = 100.0, **kwargs) -> float:
    """Median milliseconds of one replay of a CUDA graph of fn(*args, **kwargs), the L2 flushed
    before each replay (``graph_replays``): kernel time without the Python launch overhead, as
    a decode step under CUDA graphs sees it."""
    if DEV != "cuda":
        return ms(fn, *args, **kwargs)
    return ms_graphs([partial(fn, *args, **kwargs)], rep_ms)[0]


def ms_against(ref: Callable[[], object], cand: Callable[[], object]) -> tuple[float, float]:
    """(ref's, cand's) median milliseconds, their graphs' replays interleaved (``ms_graphs``)
    so that the GPU's drift over a sweep moves both alike."""
    if DEV != "cuda":
        return ms(ref), ms(cand)
    return tuple(ms_graphs([ref, cand]))


def time_peers(peers: Peers, case: tuple, act: SwiGLU, ours_fn, ours_ms: float) -> dict:
    """The peers' times on ``case`` (CUDA-graph replays where they capture, else eager) and
    our speed over the best one's (> 1: ours is faster). ``ours_fn``: our kernel, run once
    for the peers' check where any peer runs."""
    got: dict[str, dict] = {name: {"skipped": why} for name, why in peers.skipped.items()}
    calls = peers.calls(*case, act, ours_fn(*case, act)) if peers.names else {}
    for name, call in calls.items():
        if isinstance(call, str):
            got[name] = {"skipped": call}
            continue
        try:
            got[name] = {"ms": ms_graph(call), "timing": "graph"}
        except RuntimeError:  # does not capture: launches included
            got[name] = {"ms": ms(call), "timing": "eager"}
    best = min((v["ms"] for v in got.values() if "ms" in v), default=None)
    return {"peers": got, "vs_best_peer": None if best is None else best / ours_ms}


def moe_case(model: str, m: int, fragment: bool = False, seed: int = 0):
    """(x, experts, ids, routing weights); ``fragment``: the experts in the fragment layout."""
    h, e, k, i = MODELS[model]
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = MoeWeights(
        *(
            torch.randint(lo, hi, s, dtype=torch.uint8, device=DEV, generator=g)
            for lo, hi, s in (
                (0, 256, (e, 2 * i, h // 2)),
                (118, 122, (e, 2 * i, h // 32)),
                (0, 256, (e, h, i // 2)),
                (118, 122, (e, h, i // 32)),
            )
        )
    )
    ids = torch.rand(m, e, device=DEV, generator=g).topk(k, dim=-1).indices  # [M, K]
    if model.startswith("gpt-oss"):
        w = dataclasses.replace(
            w,
            b13=torch.randn(e, 2 * i, device=DEV, generator=g).bfloat16(),
            b2=torch.randn(e, h, device=DEV, generator=g).bfloat16(),
        )
    tw = torch.rand(m, k, device=DEV, generator=g)
    x = torch.randn(m, h, device=DEV, generator=g).bfloat16()
    return x, w.interleaved_copy() if fragment else w, ids, tw


def moe_act(model: str) -> SwiGLU:
    return GPT_OSS_ACT if model.startswith("gpt-oss") else SwiGLU()


def mla_case(heads: int, b: int, ctx: int, cache: torch.Tensor, table_tokens: int = 0):
    """(q [b, heads, 576], block table [b, blocks], lengths [b]) of b sequences of ctx tokens in
    random 64-token blocks of ``cache``; ``table_tokens``: tables at least that wide (a decode
    graph's are as wide as ``max_model_len``), the blocks past each length unread."""
    blocks = max(ctx, table_tokens) // 64
    table = torch.randperm(cache.shape[0], device=DEV)[: b * blocks].view(b, blocks).int()
    lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
    return torch.randn(b, heads, 576, device=DEV).bfloat16(), table, lens


def mla_torch(q, cache, table, lens, scale, v_dim):
    """Plain PyTorch: gather the pages, then bmm / softmax / bmm (one KV head shared by all)."""
    kv = cache[table.long()].flatten(1, 2)  # [B, ctx, D] (all lengths equal here)
    s = torch.bmm(q, kv.transpose(1, 2)).float() * scale  # [B, H, ctx]
    return torch.bmm(s.softmax(-1).to(q.dtype), kv[..., :v_dim])  # [B, H, v_dim]


def mla_peers(q, cache, table, lens, ours: torch.Tensor, ours_ms: float) -> dict:
    """FlashInfer's MLA decode (fa3, fa2) on the same inputs: planned once for the batch, its
    output checked against ours (relative error), timed as graph replays like ours. A backend
    that cannot run here is listed with the reason."""
    from pdserve.kernels.mla_decode_flashinfer import FlashInferMLADecode, unavailable

    names = ("flashinfer_fa3", "flashinfer_fa2")
    why = unavailable() if DEV == "cuda" else "no GPU"
    row: dict = {"peers": {n: {"skipped": why} for n in names}, "vs_best_peer": None}
    if why:
        return row
    host_lens, host_table = lens.tolist(), table.cpu().numpy()
    for name in names:
        try:
            fi = FlashInferMLADecode(name.removeprefix("flashinfer_"), few_rows=False)
            fi.plan(host_lens, host_table, cache.shape[1], graph_batch=len(host_lens))
            out = fi(q, cache, table, lens, 0.07, 512)  # builds (JIT) and plans
            err = float((out.float() - ours.float()).norm() / ours.float().norm())
            row["peers"][name] = {"ms": ms_graph(fi, q, cache, table, lens, 0.07, 512),
                                  "rel_err": err}  # fmt: skip
        except Exception as e:  # a peer that cannot run here: say why
            row["peers"][name] = {"skipped": f"{type(e).__name__}: {e}"[:200]}
    times = [v["ms"] for v in row["peers"].values() if "ms" in v]
    row["vs_best_peer"] = min(times) / ours_ms if times else None
    return row


def ceilings(copy_elems: int = 1 << 29, n: int = 8192) -> dict:
    a = torch.empty(copy_elems, dtype=torch.bfloat16, device=DEV).normal_()  # 1 GiB
    b = torch.empty_like(a)
    t_copy = ms(lambda: b.copy_(a))
    x = torch.randn(n, n, device=DEV).bfloat16()
    y = torch.randn(n, n, device=DEV).bfloat16()
    t_mm = ms(lambda: x @ y)
    return {"copy_GBps": 2 * a.numel() * 2 / t_copy / 1e6, "matmul_TFLOPs": 2 * n**3 / t_mm / 1e9}


def set_cfg(table: dict, name: str, bucket: int, value) -> None:
    """Make value this GPU's entry for the bucket (a copy: entries may share dicts)."""
    base = table.get(name) or table.get("sm90") or table["default"]
    table[name] = {k: v for k, v in base.items()}
    table[name][bucket] = value


def _best(results: dict, label: str, fn, cands, deadline: float) -> tuple[float, object]:
    """Time fn(cand) for every candidate until the deadline; failures (out of resources,
    compile errors) lose."""
    best = (float("inf"), None)
    for cand in cands:
        if time.time() > deadline:
            results[f"{label} {cand}"] = "skipped: time budget"
            continue
        try:
            t = fn(cand)
        except Exception as err:
            t = float("inf")
            print(f"  {label} {cand}: {type(err).__name__}: {str(err)[:80]}")
        results[f"{label} {cand}"] = t
        best = min(best, (t, cand), key=lambda r: r[0])
    return best


def _best_against(
    results: dict, label: str, ref, call_of, scale: float, cands, deadline: float
) -> tuple[float, object]:
    """``_best`` of the candidates, each timed against ``ref`` (the tiles before, ``scale`` ms
    alone) with their replays interleaved (``ms_against``), its time put on ref's scale. The
    winner, or (scale, None) where none is faster than ref."""

    def run(c):
        pair = ms_against(ref, call_of(c))
        results[f"{label} {c} against the tiles before"] = pair
        return scale * pair[1] / pair[0]

    t, c = _best(results, label, run, cands, deadline)
    return (t, c) if c is not None and t < scale else (scale, None)


def _tiles(c: tuple[int, ...], base: dict) -> dict[str, int]:
    """A SWEEP_SMALL or SWEEP_FRAGMENT candidate as moe_small's config of one GEMM, with the
    token block and split count of the table's entry ``base``."""
    bn, bk, warps, stages, swap, ahead, maxnreg = (*c, 0, 0)[:7]
    cfg = dict(base, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    for key in ("SWAP", "AHEAD", "maxnreg"):
        cfg.pop(key, None)
    extra = {"SWAP": swap, "AHEAD": ahead, "maxnreg": maxnreg}
    return cfg | {k: v for k, v in extra.items() if v}


def fragment_by_default() -> bool:
    """Whether this GPU's MoE backends read experts in the fragment layout by default."""
    kernels = KernelSet.resolve(DeviceInfo.detect(DEV), "prefill", dtype="bfloat16")
    return kernels.moe_codes == "interleaved"


SWEEP_TABLES = ("MOE_SMALL_FRAGMENT", "MOE_SMALL", "MOE_LARGE", "MLA_DECODE")


def sweep(
    gpu: str,
    out: dict,
    deadline: float,
    tables: tuple[str, ...] = SWEEP_TABLES,
    model: str = "deepseek-v3",
    small_m: tuple[int, ...] = (),
) -> None:
    """Time candidate configs at ``model``'s shapes (the MoE's; mla_decode's are DeepSeek's);
    make the winners this GPU's entries of ``tables`` (in this process). ``small_m``: the token
    counts moe_small's tables are swept at, each its own bucket (default: the tables')."""
    results = out.setdefault("sweep", {})
    act = moe_act(model)
    # the fragment layout first: the default on sm_90, and the sweep may run out of time
    for name, cands, fragment in (
        ("MOE_SMALL_FRAGMENT", SWEEP_FRAGMENT, True),
        ("MOE_SMALL", SWEEP_SMALL, False),
    ):
        if name not in tables:
            continue
        table = getattr(triton_configs, name)
        for m, bucket in tuple((m, m) for m in small_m) or SWEEP_SMALL_POINTS[name]:
            case = moe_case(model, m, fragment)
            entry = triton_configs.pick(table, torch.device(DEV), m)
            cfg = {k: dict(v) for k, v in entry.items()}
            ref_ms = ms_graph(moe_small_triton, *case, act, config=cfg)
            results[f"{name} M={m} entry"] = ref_ms
            for gemm in ("gemm1", "gemm2"):
                before = dict(cfg)  # the tiles each candidate is timed against

                def call_of(c, gemm=gemm, before=before, case=case):
                    tiles = dict(before, **{gemm: _tiles(c, before[gemm])})
                    return partial(moe_small_triton, *case, act, config=tiles)

                ref = partial(moe_small_triton, *case, act, config=before)
                label = f"{name} M={m} {gemm}"
                ref_ms, c = _best_against(results, label, ref, call_of, ref_ms, cands[gemm],
                                          deadline)  # fmt: skip
                if c is not None:
                    cfg[gemm] = _tiles(c, cfg[gemm])
            set_cfg(table, gpu, bucket, cfg)
            print(f"{name} {model} M<={bucket}: {cfg} {ref_ms:.3f} ms (the table's tiles: "
                  f"{results[f'{name} M={m} entry']:.3f})")  # fmt: skip
            case = None
    # the grouped GEMM's one table serves both layouts: tuned on the one this GPU runs by default
    fragment = fragment_by_default()
    for m, bucket in ((4096, 4096), (16384, 1 << 30)) if "MOE_LARGE" in tables else ():
        case = moe_case("deepseek-v3", m, fragment)
        entry = triton_configs.pick(triton_configs.MOE_LARGE, torch.device(DEV), m)
        ref = partial(moe_grouped_triton, *case, SwiGLU(), config=entry)
        results[f"moe_large M={m} entry"] = ref_ms = ms_graph(ref)

        def call_large(c, case=case):
            bm, bn, bk, nw, ns = c
            g = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw, num_stages=ns)
            return partial(moe_grouped_triton, *case, SwiGLU(), config={"gemm1": g, "gemm2": g})

        t, c = _best_against(results, f"moe_large M={m}", ref, call_large, ref_ms, SWEEP_LARGE,
                             deadline)  # fmt: skip
        if c is not None:
            g = dict(
                BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2], GROUP_M=8, num_warps=c[3], num_stages=c[4]
            )
            set_cfg(triton_configs.MOE_LARGE, gpu, bucket, {"gemm1": g, "gemm2": g})
        print(f"moe_large M<={bucket}: {t:.3f} ms, the table's tiles {ref_ms:.3f} ms"
              f"{f', replaced by {c}' if c is not None else ''}")  # fmt: skip
        case = None  # free the 6 GB of experts
    if "MLA_DECODE" not in tables:
        return
    cache = torch.empty(64 * 8192 // 64, 64, 576, dtype=torch.bfloat16, device=DEV).normal_()
    for heads, cands in SWEEP_MLA.items():  # 64 sequences of 8k: 600 MB of KV, far past L2
        q, table, lens = mla_case(heads, 64, 8192, cache)
        ref = partial(mla_decode_triton, q, cache, table, lens, 0.07, 512)  # the table's tiles
        results[f"mla_decode H={heads} entry"] = ref_ms = ms_graph(ref)

        def call_mla(c, q=q, table=table, lens=lens):
            cfg = dict(BLOCK_H=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])
            return partial(mla_decode_triton, q, cache, table, lens, 0.07, 512, config=cfg)

        t, c = _best_against(results, f"mla_decode H={heads}", ref, call_mla, ref_ms, cands,
                             deadline)  # fmt: skip
        if c is not None:
            cfg = dict(BLOCK_H=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])
            set_cfg(triton_configs.MLA_DECODE, gpu, heads if heads == 16 else 1 << 30, cfg)
        print(f"mla_decode H={heads}: {t:.3f} ms, the table's tiles {ref_ms:.3f} ms"
              f"{f', replaced by {c}' if c is not None else ''}")  # fmt: skip
    out["tuned"] = {
        name: getattr(triton_configs, name).get(gpu)
        for name in ("MOE_SMALL", "MOE_SMALL_FRAGMENT", "MOE_LARGE", "MLA_DECODE")
    }


def compiled_resources() -> list[dict]:
    try:
        return _compiled_resources()
    except Exception as err:  # introspection of Triton internals is best effort
        return [{"error": f"{type(err).__name__}: {err}"}]


def _compiled_resources() -> list[dict]:
    """Shared memory, registers, spills and MMA flavour of every kernel compiled in this run."""
    import pdserve.kernels.mla_decode_triton as mla
    import pdserve.kernels.moe_triton_grouped as grp
    import pdserve.kernels.moe_triton_small_m as sml

    rows = []
    for fn in (
        sml._gemm1_kernel,
        sml._gemm2_kernel,
        grp._gemm1_kernel,
        grp._gemm2_kernel,
        mla._decode_kernel,
    ):
        for cache in fn.device_caches.values():
            for k in cache[0].values():
                ptx = k.asm["ptx"] if "ptx" in k.asm else ""
                rows.append(
                    {
                        "kernel": k.name,
                        "shared": k.metadata.shared,
                        "num_warps": k.metadata.num_warps,
                        "regs": getattr(k, "n_regs", None),
                        "spills": getattr(k, "n_spills", None),
                        "wgmma": "wgmma" in ptx,
                        "mma_sync": "mma.sync" in ptx,
                    }
                )
    return rows


def mla_grid(ap: argparse.ArgumentParser, text: str) -> list[tuple[int, int, int]]:
    """(heads, batch, context) points of ``--mla-grid`` HEADS:BATCHES:CONTEXTS (comma lists)."""
    try:
        heads, batches, contexts = ([int(v) for v in f.split(",")] for f in text.split(":"))
    except ValueError:
        ap.error(f"--mla-grid takes HEADS:BATCHES:CONTEXTS, comma-separated integers: {text!r}")
    return [(h, b, c) for h in heads for b in batches for c in contexts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="time candidate configs first")
    ap.add_argument("--sweep-s", type=float, default=150.0, help="time the sweep may take")
    ap.add_argument(
        "--sweep-tables", default=",".join(SWEEP_TABLES), help=f"of {SWEEP_TABLES}, to sweep"
    )
    ap.add_argument("--sweep-model", default="deepseek-v3", choices=sorted(MODELS))
    ap.add_argument("--sweep-m", default="", help="moe_small's sweep points (default: its buckets)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop adding points after this")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    ap.add_argument(
        "--mla-grid",
        default="",
        metavar="HEADS:BATCHES:CONTEXTS",
        help="mla_decode's points, e.g. 16:1,2,4,8:1024,4096 (default: the built-in grid)",
    )
    args = ap.parse_args()
    grid = mla_grid(ap, args.mla_grid) if args.mla_grid else MLA_GRID
    parts = args.parts.split(",")
    if bad := sorted(set(parts) - set(PARTS)):
        ap.error(f"unknown --parts {bad}; known: {PARTS}")
    if bad := sorted(set(args.sweep_tables.split(",")) - set(SWEEP_TABLES)):
        ap.error(f"unknown --sweep-tables {bad}; known: {SWEEP_TABLES}")
    t0 = time.time()
    gpu = torch.cuda.get_device_name()
    out = {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join(["python -m pdserve.bench.kernels", *sys.argv[1:]]),
    }
    out["ceilings"] = ceil = ceilings()
    print(
        f"{gpu}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s"
    )
    if args.sweep:
        small_m = tuple(int(m) for m in args.sweep_m.split(",") if m)
        sweep(gpu, out, t0 + args.sweep_s, tuple(args.sweep_tables.split(",")),
              args.sweep_model, small_m)  # fmt: skip
    act = SwiGLU()
    dev = torch.device(DEV)
    peers = Peers()
    out["peers_skipped"] = dict(peers.skipped)
    rows = out["moe_decode"] = []
    for model in MODELS if "moe_decode" in parts else ():
        for m in DECODE_M if model == "deepseek-v3" else (1, 16, 64):
            case = moe_case(model, m)
            nbytes = case[2].unique().numel() * case[1].expert_nbytes()
            t = ms_graph(moe_small_triton, *case, moe_act(model))
            inter = (case[0], case[1].interleaved_copy(), *case[2:])  # the fragment layout
            t_inter = ms_graph(moe_small_triton, *inter, moe_act(model))
            del inter
            t_ref = ms(moe_mxfp4_torch, *case, moe_act(model))
            gbps = nbytes / t / 1e6
            rows.append(
                time_peers(peers, case, moe_act(model), moe_small_triton, t)
                | {
                    "model": model,
                    "M": m,
                    "ms": t,
                    "interleaved_ms": t_inter,
                    "GBps": gbps,
                    "pct_copy": 100 * gbps / ceil["copy_GBps"],
                    "torch_ms": t_ref,
                    "speedup": t_ref / t,
                    "config": triton_configs.pick(triton_configs.MOE_SMALL, dev, m),
                }
            )
    cross = out["moe_crossover"] = []
    fragment = "moe_crossover" in parts and fragment_by_default()  # the layout the GPU runs
    for m in CROSS_M if "moe_crossover" in parts else ():
        case = moe_case("deepseek-v3", m, fragment)
        small = ms_graph(moe_small_triton, *case, act)
        grouped = ms_graph(moe_grouped_triton, *case, act)
        cross.append({"M": m, "small_ms": small, "grouped_ms": grouped})
    wins = [r["grouped_ms"] < r["small_ms"] for r in cross]
    out["moe_crossover_m"] = next((r["M"] for j, r in enumerate(cross) if all(wins[j:])), None)
    rows = out["moe_prefill"] = []
    prefill = [("deepseek-v3", m) for m in PREFILL_M] + [("deepseek-v2-lite", 4096)]
    for model, m in prefill if "moe_prefill" in parts else ():
        if time.time() - t0 > args.budget_s:
            rows.append({"model": model, "M": m, "skipped": "time budget"})
            continue
        case = moe_case(model, m)
        h, _, k, i = MODELS[model]
        flops = 6 * m * k * h * i
        t = ms_graph(moe_grouped_triton, *case, act)
        inter = (case[0], case[1].interleaved_copy(), *case[2:])  # the fragment layout
        t_inter = ms_graph(moe_grouped_triton, *inter, act)
        del inter
        t_ref = ms(moe_mxfp4_torch, *case, act)
        tf = flops / t / 1e9
        rows.append(
            time_peers(peers, case, act, moe_grouped_triton, t)
            | {
                "model": model,
                "M": m,
                "ms": t,
                "interleaved_ms": t_inter,
                "TFLOPs": tf,
                "pct_matmul": 100 * tf / ceil["matmul_TFLOPs"],
                "torch_ms": t_ref,
                "speedup": t_ref / t,
                "config": triton_configs.pick(triton_configs.MOE_LARGE, dev, m),
            }
        )
        del case
    rows = out["mla_decode"] = []
    blocks = max(b * c for _, b, c in grid) // 64
    if "mla_decode" in parts:
        cache = torch.empty(blocks, 64, 576, dtype=torch.bfloat16, device=DEV).normal_()  # 4.8 GB
    for heads, b, ctx in grid if "mla_decode" in parts else ():
        if time.time() - t0 > args.budget_s:
            rows.append({"heads": heads, "B": b, "ctx": ctx, "skipped": "time budget"})
            continue
        q, table, lens = mla_case(heads, b, ctx, cache)
        t = ms_graph(mla_decode_triton, q, cache, table, lens, 0.07, 512)
        t_ref = ms(mla_torch, q, cache, table, lens, 0.07, 512)
        ours = mla_decode_triton(q, cache, table, lens, 0.07, 512)
        gbps = (b * ctx * 576 * 2 + q.numel() * 2 + b * heads * 512 * 2) / t / 1e6
        tf = 2 * b * heads * ctx * (576 + 512) / t / 1e9
        rows.append(
            {
                "heads": heads,
                "B": b,
                "ctx": ctx,
                "ms": t,
                "GBps": gbps,
                "pct_copy": 100 * gbps / ceil["copy_GBps"],
                "TFLOPs": tf,
                "pct_matmul": 100 * tf / ceil["matmul_TFLOPs"],
                "torch_ms": t_ref,
                "speedup": t_ref / t,
                "config": triton_configs.mla_decode_config(triton_configs.device_keys(dev), heads),
                **mla_peers(q, cache, table, lens, ours, t),
            }
        )
    out["compiled"] = compiled_resources()
    out["wall_s"] = time.time() - t0
    report(out)
    write_result(out, "kernels", gpu, args.json)
    print(f"in {out['wall_s']:.0f} s")


def _peer(r: dict) -> str:
    """The best peer's ms and our speed over its (or "-" where no peer ran)."""
    times = [v["ms"] for v in r.get("peers", {}).values() if "ms" in v]
    if not times:
        return f"{'-':>9}{'-':>8}"
    return f"{min(times):>9.3f}{r['vs_best_peer']:>7.2f}x"


def report(out: dict) -> None:
    c = out["ceilings"]
    print(
        f"\n{out['gpu']}  copy {c['copy_GBps']:.0f} GB/s  matmul {c['matmul_TFLOPs']:.0f} TFLOP/s"
    )
    for name, why in out.get("peers_skipped", {}).items():
        print(f"peer {name} not run: {why}")
    print(
        "MoE decode (moe_small)      M     ms    GB/s  %copy  torch ms  speedup  peer ms  ours/peer"
        "  interleaved ms"
    )
    for r in out["moe_decode"]:
        print(
            f"  {r['model']:<22}{r['M']:>5}{r['ms']:>8.3f}{r['GBps']:>8.0f}{r['pct_copy']:>7.1f}"
            f"{r['torch_ms']:>10.2f}{r['speedup']:>8.1f}x{_peer(r)}{r['interleaved_ms']:>15.3f}"
        )
    print("crossover (deepseek-v3)     M  small ms  grouped ms")
    for r in out["moe_crossover"]:
        print(f"  {'':<22}{r['M']:>5}{r['small_ms']:>10.3f}{r['grouped_ms']:>11.3f}")
    print(f"  -> grouped from M = {out['moe_crossover_m']}")
    print(
        "MoE prefill (moe_large)     M     ms  TFLOP/s  %mm  torch ms  speedup  peer ms  ours/peer"
        "  interleaved ms"
    )
    for r in out["moe_prefill"]:
        if "skipped" in r:
            print(f"  {r['model']:<22}{r['M']:>5}  skipped ({r['skipped']})")
            continue
        print(
            f"  {r['model']:<22}{r['M']:>5}{r['ms']:>8.2f}{r['TFLOPs']:>8.0f}"
            f"{r['pct_matmul']:>6.1f}{r['torch_ms']:>10.1f}{r['speedup']:>8.1f}x{_peer(r)}"
            f"{r['interleaved_ms']:>15.2f}"
        )
    print(
        "MLA decode  heads   B    ctx     ms    GB/s  %copy  TFLOP/s  %mm  torch ms  speedup"
        "  peer ms  ours/peer"
    )
    for r in out["mla_decode"]:
        if "skipped" in r:
            print(f"  {r['heads']:>13}{r['B']:>4}{r['ctx']:>7}  skipped")
            continue
        print(
            f"  {r['heads']:>13}{r['B']:>4}{r['ctx']:>7}{r['ms']:>8.3f}{r['GBps']:>8.0f}"
            f"{r['pct_copy']:>7.1f}{r['TFLOPs']:>9.1f}{r['pct_matmul']:>5.1f}{r['torch_ms']:>10.3f}"
            f"{r['speedup']:>8.1f}x{_peer(r)}"
        )
    why = {v["skipped"] for r in out["mla_decode"] for v in r.get("peers", {}).values()
           if "skipped" in v}  # fmt: skip
    for w in sorted(why):
        print(f"MLA peer not run: {w}")


if __name__ == "__main__":
    main()
