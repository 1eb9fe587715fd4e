"""Triton MXFP4 MoE for many tokens (prefill): op ``moe_large``, backend ``triton``.

Contract: ``moe_reference``. A grouped GEMM over expert-sorted token blocks:

1. ``align_by_expert`` (torch ops, no host sync): the M*K slots sorted by expert, each expert's
   run padded to a multiple of BLOCK_M (pad entries hold the sentinel M*K), and the expert of
   every BLOCK_M block; buffers are sized for the worst case, so shapes depend on M alone.
2. ``_gemm1_kernel``: per (block, N tile), gathers the block's token rows, dequantizes the
   expert's gate and up [BLOCK_N, BLOCK_K] weight tiles on chip into the B operand of
   ``tl.dot`` (wgmma on Hopper), applies bias and SwiGLU, writes h in sorted order.
3. ``_gemm2_kernel``: h rows of the block (contiguous) times W2, bias, routing weight, scattered
   back to per-slot rows; ``topk_sum`` adds each token's K slots.
Programs are ordered in GROUP_M bands of blocks so that blocks of one expert share weight tiles
in L2. Blocks past the padded total, and invalid expert ids, do no work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import triton_configs
from pdserve.kernels.moe_k_loops import gate_up_swiglu
from pdserve.kernels.moe_reference import MoeWeights, SwiGLU
from pdserve.kernels.moe_slot_sums import topk_sum
from pdserve.kernels.moe_triton_common import (
    acc_rows,
    acc_zeros,
    check_moe_inputs,
    fast_dequant,
    fit_block_k,
    layout_args,
    mma_xw,
    output_like,
    upcast_dots,
)
from pdserve.kernels.mxfp4_tile import code_ptrs, code_views, load_codes


def align_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [M, K] -> (sorted_slots [NB * block_m] int32, block_expert [NB] int32).

    NB = cdiv(S + min(E, S) * (block_m - 1), block_m) bounds the padded total for any routing.
    Pad entries of sorted_slots hold S = M*K; blocks past the total have expert E.
    """
    s = topk_ids.numel()
    dev = topk_ids.device
    nb = triton.cdiv(s + min(num_experts, s) * (block_m - 1), block_m)
    ids = topk_ids.reshape(-1).long()  # [S]
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)  # invalid -> bucket E
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, ids, torch.ones_like(ids))  # [E+1]
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m  # [E]
    pad_end = padded.cumsum(0)  # [E]
    pad_start = torch.cat([pad_end - padded, pad_end.new_full((1,), nb * block_m)])  # [E+1]
    order = torch.argsort(ids, stable=True)  # [S] slots grouped by expert
    sorted_ids = ids[order]
    first = counts.cumsum(0) - counts  # [E+1] first sorted position of each bucket
    dest = pad_start[sorted_ids] + torch.arange(s, device=dev) - first[sorted_ids]  # [S]
    sorted_slots = torch.full((nb * block_m + 1,), s, dtype=torch.int32, device=dev)
    # invalid slots all land on the extra last entry, which is cut off
    sorted_slots.scatter_(0, torch.where(sorted_ids < num_experts, dest, nb * block_m), order.int())
    block_start = torch.arange(nb, device=dev) * block_m
    block_expert = torch.searchsorted(pad_end, block_start, right=True).int()  # [NB], E past end
    return sorted_slots[: nb * block_m], block_expert


@triton.jit
def _tile_ids(NUM_BLOCKS, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (block, N tile), walking GROUP_M blocks at a time across all N tiles."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(NUM_BLOCKS - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit(do_not_specialize=["NUM_BLOCKS", "S"])  # one compile for every token count
def _gemm1_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, h_ptr, slots_ptr, bexp_ptr,
    NUM_BLOCKS, S, E, H, I, stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_be,
    stride_hm, alpha, beta, limit,
    TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, UPCAST: tl.constexpr,
    FAST: tl.constexpr, INTERLEAVED: tl.constexpr, SWAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_ids(NUM_BLOCKS, I, BLOCK_N, GROUP_M)
    expert = tl.load(bexp_ptr + pid_m)
    if expert < E:
        e = expert.to(tl.int64)
        dtype = x_ptr.dtype.element_ty
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(slots_ptr + rows)  # [BM], S on pad rows
        rmask = slot < S
        n0 = pid_n * BLOCK_N
        n = n0 + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + (slot // TOPK).to(tl.int64)[:, None] * stride_xm + kk[None, :]  # [BM, BK]
        h = gate_up_swiglu(
            x_ptrs, rmask, w_ptr + e * stride_we, s_ptr + e * stride_se, n0, b_ptr + e * stride_be,
            H, I, stride_wn, stride_sn, alpha, beta, limit, dtype, HAS_BIAS, HAS_LIMIT, UPCAST,
            FAST, INTERLEAVED, SWAP, BLOCK_M, BLOCK_N, BLOCK_K, 0,
        )  # fmt: skip  # [BM, BN]
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + n[None, :]  # sorted order
        tl.store(h_ptrs, h, mask=(n < I)[None, :])


@triton.jit(do_not_specialize=["NUM_BLOCKS", "S"])
def _gemm2_kernel(
    h_ptr, w_ptr, s_ptr, b_ptr, tw_ptr, ys_ptr, slots_ptr, bexp_ptr,
    NUM_BLOCKS, S, E, H, I, stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_be,
    stride_ym,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, INTERLEAVED: tl.constexpr,
    SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_ids(NUM_BLOCKS, H, BLOCK_N, GROUP_M)
    expert = tl.load(bexp_ptr + pid_m)
    if expert < E:
        e = expert.to(tl.int64)
        dtype = h_ptr.dtype.element_ty
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(slots_ptr + rows)
        rmask = slot < S
        n0 = pid_n * BLOCK_N
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < H
        kk = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + kk[None, :]  # [BM, BK]
        w_ptrs, sc_ptrs, rows_ok = code_ptrs(w_ptr + e * stride_we, s_ptr + e * stride_se, n0,
                                             H, stride_wn, stride_sn, INTERLEAVED, BLOCK_N,
                                             BLOCK_K)  # fmt: skip
        acc = acc_zeros(BLOCK_M, BLOCK_N, SWAP)
        for k0 in range(0, I, BLOCK_K):  # BLOCK_K divides I (``fit_block_k``)
            ht = tl.load(h_ptrs + k0)
            wt = load_codes(w_ptrs, sc_ptrs, rows_ok, k0, I, dtype, FAST, INTERLEAVED, BLOCK_N,
                            BLOCK_K, False)  # fmt: skip  # [BN, BK]
            acc = mma_xw(ht, wt, acc, UPCAST, SWAP)
        acc = acc_rows(acc, SWAP)  # [BM, BN]
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * stride_be + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tw = tl.load(tw_ptr + slot, mask=rmask, other=0.0)  # [BM]
        y = acc.to(dtype).to(tl.float32) * tw[:, None]
        y_ptrs = ys_ptr + slot.to(tl.int64)[:, None] * stride_ym + n[None, :]
        tl.store(y_ptrs, y, mask=rmask[:, None] & nmask[None, :])


def _run(cfg: dict, kernel, num_blocks: int, n: int, *args, INTERLEAVED: bool, **consts) -> None:
    grid = (num_blocks * triton.cdiv(n, cfg["BLOCK_N"]),)
    kernel[grid](
        *args,
        **consts,
        **layout_args(cfg, INTERLEAVED),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def moe_grouped_triton(
    x: torch.Tensor,
    weights: MoeWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    act: SwiGLU,
    *,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoE for large M; same contract as ``moe_mxfp4_torch``. ``config`` overrides the tuned
    {"gemm1": {...}, "gemm2": {...}} tiles; both GEMMs must share BLOCK_M (one alignment).
    ``out`` [M, H] receives the result."""
    check_moe_inputs(x, weights, topk_ids, topk_weights, act)
    m, hidden = x.shape
    k = topk_ids.shape[1]
    out = output_like(x, tuple(x.shape), out)  # [M, H]
    if m == 0:
        return out
    cfg = config or triton_configs.pick(triton_configs.MOE_LARGE, x.device, m)
    e, inter = weights.num_experts, weights.intermediate
    c1, c2 = fit_block_k(cfg["gemm1"], hidden), fit_block_k(cfg["gemm2"], inter)
    assert c1["BLOCK_M"] == c2["BLOCK_M"] and c1["BLOCK_K"] % 32 == 0 and c2["BLOCK_K"] % 32 == 0
    s = m * k
    topk_ids = topk_ids.contiguous()
    slots, bexp = align_by_expert(topk_ids, e, c1["BLOCK_M"])
    nb = bexp.shape[0]
    up = upcast_dots(x.dtype)
    fast = fast_dequant(x, weights)
    b13, b2 = weights.b13, weights.b2
    h = torch.empty(nb * c1["BLOCK_M"], inter, dtype=x.dtype, device=x.device)  # [NB*BM, I]
    limit = 0.0 if act.limit is None else float(act.limit)
    w13, s13, *st13 = code_views(weights.w13, weights.s13, weights.interleaved)
    _run(
        c1, _gemm1_kernel, nb, inter,
        x, w13, s13, b13 if b13 is not None else x, h, slots, bexp,
        nb, s, e, hidden, inter, x.stride(0), *st13, 0 if b13 is None else b13.stride(0),
        h.stride(0), float(act.alpha), float(act.beta), limit,
        TOPK=k, HAS_BIAS=b13 is not None, HAS_LIMIT=act.limit is not None, UPCAST=up, FAST=fast,
        INTERLEAVED=weights.interleaved,
    )  # fmt: skip
    ys = torch.empty(s, hidden, dtype=x.dtype, device=x.device)  # [S, H], rounded like the ref
    tw = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [S]
    w2, s2, *st2 = code_views(weights.w2, weights.s2, weights.interleaved)
    _run(
        c2, _gemm2_kernel, nb, hidden,
        h, w2, s2, b2 if b2 is not None else x, tw, ys, slots, bexp,
        nb, s, e, hidden, inter, h.stride(0), *st2, 0 if b2 is None else b2.stride(0),
        ys.stride(0),
        HAS_BIAS=b2 is not None, UPCAST=up, FAST=fast, INTERLEAVED=weights.interleaved,
    )  # fmt: skip
    topk_sum(ys, topk_ids, e, out)
    return out
