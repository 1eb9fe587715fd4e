"""Triton MXFP4 MoE for few tokens (decode): op ``moe_small``, backend ``triton``.

Contract: ``moe_reference``. Four launches, no host sync, shapes fixed by M (CUDA-graph safe):

1. ``_group_kernel`` (one program): histogram of the M*K expert ids, the list of active experts,
   and the slots (token * K + k) sorted by expert.
2. ``_gemm1_kernel``, grid (active expert, N tile, split): the program of the i-th active expert
   reads its gate and up weight rows once, dequantizing each [BLOCK_N, BLOCK_K] tile on chip
   into the MMA's operand, for all of that expert's slots at once (BLOCK_M rows per pass), and
   writes h = SwiGLU(x W13^T + b13) per slot. Programs past the active experts do nothing.
3. ``_gemm2_kernel``, same grid over H: y = (h W2^T + b2) * routing weight, per slot.
4. ``topk_sum``: each token's K slots added (slots of invalid expert ids are never written and
   never read, so they add nothing).
Split K (``split_k``: a tile config's SPLIT_K, or SPLIT_K_FEW where a GEMM has few programs):
each split sums its share of the reduction in float32; ``swiglu_splits`` (one launch more)
finishes the gate/up splits, ``topk_sum`` the down projection's. Expert weights are read once
per call for batches up to MAX_SLOTS / K tokens; larger batches run in token chunks (the grouped
kernel is the one for them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import triton_configs
from pdserve.kernels.dependent_launch import launch_args, pdl_start
from pdserve.kernels.device import sm_count
from pdserve.kernels.moe_k_loops import down_acc, gate_up_accs, gate_up_swiglu, split_range
from pdserve.kernels.moe_reference import MoeWeights, SwiGLU
from pdserve.kernels.moe_slot_sums import swiglu_splits, topk_sum
from pdserve.kernels.moe_triton_common import (
    check_moe_inputs,
    fast_dequant,
    layout_args,
    output_like,
    upcast_dots,
)
from pdserve.kernels.mxfp4_tile import code_ptrs, code_views

MAX_SLOTS = 8192  # (token, expert) slots one launch groups; larger batches run in token chunks
# A GEMM whose programs are fewer than this many per SM splits its reduction SPLIT_K_FEW ways
# where its tiles name that count (one token's gate/up: 132 programs on DeepSeek-V2-Lite and 180
# on GPT-OSS, split in two, ran 5-10% faster on an H100 and an H200; DeepSeek-V3's 256 ran
# 5-6% slower; bench.moe_splits, BENCHMARKS.md).
FEW_PROGRAMS_PER_SM = 1.5


@triton.jit(do_not_specialize=["S", "A"])  # one compile per block size, whatever the count
def _group_kernel(
    ids_ptr, expert_ptr, start_ptr, count_ptr, slots_ptr, S, E, A,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_A: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_start(PDL)  # see kernels.dependent_launch
    s = tl.arange(0, BLOCK_S)
    ids = tl.load(ids_ptr + s, mask=s < S, other=-1).to(tl.int32)  # [BLOCK_S]
    valid = (ids >= 0) & (ids < E) & (s < S)
    ids = tl.where(valid, ids, E)  # invalid and padding slots count in the spare bin E
    counts = tl.histogram(ids, BLOCK_E)  # [BLOCK_E]
    e = tl.arange(0, BLOCK_E)
    starts = tl.cumsum(counts, 0) - counts  # first sorted position of each expert
    active = (counts > 0) & (e < E)
    idx = tl.cumsum(active.to(tl.int32), 0) - 1  # rank of each active expert
    n_active = tl.sum(active.to(tl.int32), 0)
    tl.store(expert_ptr + idx, e, mask=active)
    tl.store(start_ptr + idx, starts, mask=active)
    tl.store(count_ptr + idx, counts, mask=active)
    a = tl.arange(0, BLOCK_A)
    tl.store(count_ptr + a, tl.zeros([BLOCK_A], tl.int32), mask=(a >= n_active) & (a < A))
    keys = tl.sort(ids * BLOCK_S + s)  # expert-major, slot-minor; invalid slots sort last
    tl.store(slots_ptr + s, keys % BLOCK_S, mask=s < S)


@triton.jit
def _gemm1_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, h_ptr, expert_ptr, start_ptr, count_ptr, slots_ptr,
    H, I, stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_be, stride_hs,
    stride_hm, alpha, beta, limit,
    TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, UPCAST: tl.constexpr,
    FAST: tl.constexpr, INTERLEAVED: tl.constexpr, SWAP: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AHEAD: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_start(PDL)  # see kernels.dependent_launch
    i = tl.program_id(0)
    count = tl.load(count_ptr + i)  # 0 for programs past the active experts
    e = tl.load(expert_ptr + i, mask=count > 0, other=0).to(tl.int64)
    start = tl.load(start_ptr + i, mask=count > 0, other=0)
    dtype = x_ptr.dtype.element_ty
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    sk = tl.program_id(2)
    k_lo, k_hi, tail = split_range(H, sk, SPLIT_K, BLOCK_K)  # this split's K tiles
    for r0 in range(0, count, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        rmask = r < count
        slot = tl.load(slots_ptr + start + r, mask=rmask, other=0)  # [BM]
        x_ptrs = x_ptr + (slot // TOPK).to(tl.int64)[:, None] * stride_xm + kk[None, :]
        h_ptrs = h_ptr + slot.to(tl.int64)[:, None] * stride_hm + n[None, :]
        hmask = rmask[:, None] & (n < I)[None, :]
        if SPLIT_K == 1:
            h = gate_up_swiglu(
                x_ptrs, rmask, w_ptr + e * stride_we, s_ptr + e * stride_se, n0,
                b_ptr + e * stride_be, H, I, stride_wn, stride_sn, alpha, beta, limit, dtype,
                HAS_BIAS, HAS_LIMIT, UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_M, BLOCK_N, BLOCK_K,
                AHEAD,
            )  # fmt: skip  # [BM, BN]
            tl.store(h_ptrs, h, mask=hmask)
        else:  # this split's float32 gate and up sums; swiglu_splits adds the splits
            acc_g, acc_u = gate_up_accs(
                x_ptrs, rmask, w_ptr + e * stride_we, s_ptr + e * stride_se, n0, H, I,
                stride_wn, stride_sn, k_lo, k_hi, tail, dtype, UPCAST, FAST, INTERLEAVED, SWAP,
                BLOCK_M, BLOCK_N, BLOCK_K, AHEAD,
            )  # fmt: skip  # [BM, BN] each
            tl.store(h_ptrs + sk * stride_hs, acc_g, mask=hmask)
            tl.store(h_ptrs + sk * stride_hs + I, acc_u, mask=hmask)


@triton.jit
def _gemm2_kernel(
    h_ptr, w_ptr, s_ptr, b_ptr, tw_ptr, ys_ptr, expert_ptr, start_ptr, count_ptr, slots_ptr,
    H, I, stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_be, stride_ys,
    stride_ym,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, INTERLEAVED: tl.constexpr,
    SWAP: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, AHEAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_start(PDL)  # see kernels.dependent_launch
    i = tl.program_id(0)
    count = tl.load(count_ptr + i)
    e = tl.load(expert_ptr + i, mask=count > 0, other=0).to(tl.int64)
    start = tl.load(start_ptr + i, mask=count > 0, other=0)
    dtype = h_ptr.dtype.element_ty
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    nmask = n < H
    kk = tl.arange(0, BLOCK_K)
    w_ptrs, sc_ptrs, rows_ok = code_ptrs(
        w_ptr + e * stride_we, s_ptr + e * stride_se, n0, H, stride_wn, stride_sn, INTERLEAVED,
        BLOCK_N, BLOCK_K,
    )  # fmt: skip
    k_lo, k_hi, tail = split_range(I, tl.program_id(2), SPLIT_K, BLOCK_K)
    for r0 in range(0, count, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        rmask = r < count
        slot = tl.load(slots_ptr + start + r, mask=rmask, other=0).to(tl.int64)  # [BM]
        h_ptrs = h_ptr + slot[:, None] * stride_hm + kk[None, :]
        acc = down_acc(
            h_ptrs, w_ptrs, sc_ptrs, rmask, rows_ok, k_lo, k_hi, tail, I, dtype, UPCAST, FAST,
            INTERLEAVED, SWAP, BLOCK_M, BLOCK_N, BLOCK_K, AHEAD,
        )  # fmt: skip  # [BM, BN]
        y_ptrs = ys_ptr + tl.program_id(2) * stride_ys + slot[:, None] * stride_ym + n[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                b = tl.load(b_ptr + e * stride_be + n, mask=nmask, other=0.0)
                acc += b.to(tl.float32)[None, :]
            tw = tl.load(tw_ptr + slot, mask=rmask, other=0.0)  # [BM] routing weights
            y = acc.to(dtype).to(tl.float32) * tw[:, None]
        else:  # this split's float32 sum; topk_sum adds the splits, bias and routing weight
            y = acc
        tl.store(y_ptrs, y, mask=rmask[:, None] & nmask[None, :])


def _launch(cfg: dict, kernel, grid, *args, INTERLEAVED: bool, **consts) -> None:
    """One GEMM's launch at a tile config; its ``maxnreg``, where named, caps the registers a
    thread takes (more programs fit an SM; ptxas spills past the cap)."""
    cap = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}
    kernel[grid](
        *args,
        **consts,
        **layout_args(cfg, INTERLEAVED),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        AHEAD=cfg.get("AHEAD", 0),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **cap,
    )


def split_k(cfg: dict, programs: int, num_sms: int) -> int:
    """A GEMM's split count for a launch of ``programs`` programs per split (fixed by shapes,
    so graph-safe): SPLIT_K_FEW where the tiles name one and the programs are fewer than
    FEW_PROGRAMS_PER_SM per SM, else SPLIT_K (1 where unnamed)."""
    few = cfg.get("SPLIT_K_FEW")
    if few and programs < FEW_PROGRAMS_PER_SM * num_sms:
        return few
    return cfg.get("SPLIT_K", 1)


def _moe_chunk(x, weights, topk_ids, topk_weights, act, out, cfg) -> None:
    m, hidden = x.shape
    k = topk_ids.shape[1]
    e, inter = weights.num_experts, weights.intermediate
    s = m * k
    a = min(s, e)  # at most this many experts are active
    dev = x.device
    p = launch_args(dev)
    ids = topk_ids.reshape(-1)  # [S]
    expert = torch.empty(a, dtype=torch.int32, device=dev)
    start = torch.empty(a, dtype=torch.int32, device=dev)
    count = torch.empty(a, dtype=torch.int32, device=dev)
    slots = torch.empty(s, dtype=torch.int32, device=dev)
    _group_kernel[(1,)](
        ids, expert, start, count, slots, s, e, a,
        BLOCK_S=max(32, triton.next_power_of_2(s)), BLOCK_E=max(32, triton.next_power_of_2(e + 1)),
        BLOCK_A=max(32, triton.next_power_of_2(a)), **p,
    )  # fmt: skip
    up = upcast_dots(x.dtype)
    fast = fast_dequant(x, weights)
    c1, c2 = cfg["gemm1"], cfg["gemm2"]  # K tiles past H or I are masked (a multiple of 32)
    sms = sm_count(dev)
    split1 = split_k(c1, a * triton.cdiv(inter, c1["BLOCK_N"]), sms)
    split2 = split_k(c2, a * triton.cdiv(hidden, c2["BLOCK_N"]), sms)
    h = torch.empty(s, inter, dtype=x.dtype, device=dev)  # [S, I]
    # split K: each split's float32 gate and up sums, [SPLIT_K, S, 2I]
    part = h if split1 == 1 else torch.empty(split1, s, 2 * inter, dtype=torch.float32, device=dev)
    b13, b2 = weights.b13, weights.b2
    limit = 0.0 if act.limit is None else float(act.limit)
    w13, s13, *st13 = code_views(weights.w13, weights.s13, weights.interleaved)
    _launch(
        c1, _gemm1_kernel, (a, triton.cdiv(inter, c1["BLOCK_N"]), split1),
        x, w13, s13, b13 if b13 is not None else x, part, expert, start, count, slots,
        hidden, inter, x.stride(0), *st13, 0 if b13 is None else b13.stride(0),
        part.stride(0) if split1 > 1 else 0, part.stride(-2), float(act.alpha), float(act.beta),
        limit, TOPK=k, HAS_BIAS=b13 is not None, HAS_LIMIT=act.limit is not None, UPCAST=up,
        FAST=fast, INTERLEAVED=weights.interleaved, SPLIT_K=split1, **p,
    )  # fmt: skip
    if split1 > 1:
        swiglu_splits(part, ids, e, b13, act, h)
    ys = torch.empty(split2, s, hidden, dtype=torch.float32, device=dev)  # [SPLIT_K, S, H]
    tw = topk_weights.reshape(-1).to(torch.float32)  # [S]
    w2, s2, *st2 = code_views(weights.w2, weights.s2, weights.interleaved)
    _launch(
        c2, _gemm2_kernel, (a, triton.cdiv(hidden, c2["BLOCK_N"]), split2),
        h, w2, s2, b2 if b2 is not None else x, tw, ys, expert, start, count, slots,
        hidden, inter, h.stride(0), *st2, 0 if b2 is None else b2.stride(0), ys.stride(0),
        ys.stride(1), HAS_BIAS=b2 is not None, UPCAST=up, FAST=fast,
        INTERLEAVED=weights.interleaved, SPLIT_K=split2, **p,
    )  # fmt: skip
    if split2 == 1:
        topk_sum(ys[0], topk_ids, e, out)
    else:
        topk_sum(ys, topk_ids, e, out, tw=tw, b2=b2)


def moe_small_triton(
    x: torch.Tensor,
    weights: MoeWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    act: SwiGLU,
    *,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoE for small M; same contract as ``moe_mxfp4_torch``. ``config`` overrides the tuned
    {"gemm1": {...}, "gemm2": {...}} tiles (tests use it to force several tiles per dim);
    ``out`` [M, H] receives the result."""
    check_moe_inputs(x, weights, topk_ids, topk_weights, act)
    m, k = topk_ids.shape
    out = output_like(x, tuple(x.shape), out)  # [M, H]
    if m == 0:
        return out
    if k > MAX_SLOTS:
        raise ValueError(f"top-k {k} exceeds {MAX_SLOTS} slots per launch")
    table = triton_configs.MOE_SMALL_FRAGMENT if weights.interleaved else triton_configs.MOE_SMALL
    cfg = config or triton_configs.pick(table, x.device, m)
    for c in (cfg["gemm1"], cfg["gemm2"]):
        assert c["BLOCK_K"] % 32 == 0 and c["BLOCK_M"] >= 16 and c["BLOCK_N"] >= 16, c
        assert c.get("AHEAD", 0) in (0, 1, 2), c  # moe_k_loops
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    chunk = MAX_SLOTS // k  # tokens per launch; fixed by the shapes, so graph-safe
    for m0 in range(0, m, chunk):
        m1 = min(m, m0 + chunk)
        _moe_chunk(x[m0:m1], weights, topk_ids[m0:m1], topk_weights[m0:m1], act, out[m0:m1], cfg)
    return out
