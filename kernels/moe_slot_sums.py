"""The MoE kernels' sums per (token, expert) slot after their GEMMs: a token's top-k slots into
its output (``topk_sum``, both Triton MoE backends), and the float32 partial sums of a split
reduction (``swiglu_splits`` for gate/up; ``topk_sum`` with SPLIT_K partials for the down
projection), finished as one split finishes them: bias, rounding to the model dtype, SwiGLU or
the routing weight. Slots of invalid expert ids are never written and add nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.dependent_launch import launch_args, pdl_start
from pdserve.kernels.moe_reference import SwiGLU
from pdserve.kernels.moe_triton_common import swiglu


@triton.jit
def _swiglu_splits_kernel(
    part_ptr, ids_ptr, b_ptr, h_ptr, E, I, stride_ps, stride_pm, stride_be, stride_hm,
    alpha, beta, limit,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK_I: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """h[s] = swiglu of slot s's gate and up, each the sum of its SPLIT_K partial accumulators
    (part [SPLIT_K, S, 2I]: gate then up) plus the expert's bias, rounded as ``gate_up_swiglu``
    rounds. Slots of invalid expert ids were never written and are left alone."""
    pdl_start(PDL)  # see kernels.dependent_launch
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    e = tl.load(ids_ptr + s)
    ok = (cols < I) & (cols * 0 + e >= 0) & (cols * 0 + e < E)  # per column: see topk_sum
    row = part_ptr + s.to(tl.int64) * stride_pm + cols
    gate = tl.zeros([BLOCK_I], dtype=tl.float32)
    up = tl.zeros([BLOCK_I], dtype=tl.float32)
    for sk in tl.static_range(SPLIT_K):
        gate += tl.load(row + sk * stride_ps, mask=ok, other=0.0)
        up += tl.load(row + sk * stride_ps + I, mask=ok, other=0.0)
    if HAS_BIAS:
        b_row = b_ptr + e.to(tl.int64) * stride_be + cols
        gate += tl.load(b_row, mask=ok, other=0.0).to(tl.float32)
        up += tl.load(b_row + I, mask=ok, other=0.0).to(tl.float32)
    dtype = h_ptr.dtype.element_ty
    h = swiglu(gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32), alpha, beta, limit,
               HAS_LIMIT)  # fmt: skip
    tl.store(h_ptr + s.to(tl.int64) * stride_hm + cols, h, mask=ok)


def swiglu_splits(
    part: torch.Tensor, ids: torch.Tensor, num_experts: int, b13: torch.Tensor | None,
    act: SwiGLU, h: torch.Tensor,
) -> None:  # fmt: skip
    """part [SPLIT_K, S, 2I] float32 partial gate/up accumulators per slot, ids [S] -> h [S, I]
    (written in place): ``gate_up_swiglu``'s epilogue over the splits' sum."""
    splits, s, two_i = part.shape
    inter = two_i // 2
    assert h.shape == (s, inter) and part.stride(2) == 1 and h.stride(1) == 1 and ids.numel() == s
    block = min(1024, triton.next_power_of_2(inter))
    _swiglu_splits_kernel[(s, triton.cdiv(inter, block))](
        part, ids, b13 if b13 is not None else part, h, num_experts, inter, part.stride(0),
        part.stride(1), 0 if b13 is None else b13.stride(0), h.stride(0), float(act.alpha),
        float(act.beta), 0.0 if act.limit is None else float(act.limit),
        SPLIT_K=splits, HAS_BIAS=b13 is not None, HAS_LIMIT=act.limit is not None, BLOCK_I=block,
        **launch_args(h.device),
    )  # fmt: skip


@triton.jit
def _topk_sum_kernel(
    ys_ptr, ids_ptr, tw_ptr, b_ptr, out_ptr, H, E, stride_split, stride_ys, stride_be, stride_out,
    TOPK: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """out[m] = sum over valid k of slot m * TOPK + k's output; slots of invalid ids were never
    written. SPLIT_K == 1: ys holds each slot's output, routing weight applied. Else ys holds
    SPLIT_K partial float32 accumulators per slot, and a slot's output is their sum plus the
    expert's bias, rounded to the model dtype, times its routing weight (the down
    projection's epilogue, as one split applies it)."""
    pdl_start(PDL)  # see kernels.dependent_launch
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOPK):
        slot = m * TOPK + k
        e = tl.load(ids_ptr + slot)
        # the id's test made per column: Triton 3.9's interpreter mistypes a block & scalar mask
        ok = cmask & (cols * 0 + e >= 0) & (cols * 0 + e < E)
        row = ys_ptr + slot.to(tl.int64) * stride_ys + cols
        if SPLIT_K == 1:
            acc += tl.load(row, mask=ok, other=0.0).to(tl.float32)
        else:
            y = tl.zeros([BLOCK_H], dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                y += tl.load(row + sk * stride_split, mask=ok, other=0.0)
            if HAS_BIAS:
                b_row = b_ptr + e.to(tl.int64) * stride_be + cols
                y += tl.load(b_row, mask=ok, other=0.0).to(tl.float32)
            tw = tl.load(tw_ptr + slot)  # an invalid slot's weight may be anything: not added
            acc += tl.where(ok, y.to(out_ptr.dtype.element_ty).to(tl.float32) * tw, 0.0)
    tl.store(out_ptr + m.to(tl.int64) * stride_out + cols, acc, mask=cmask)


def topk_sum(
    ys: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor, *,
    tw: torch.Tensor | None = None, b2: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """ys [M*K, H] per-slot outputs (routing weight applied) -> out [M, H] (written in place).
    Or ys [SPLIT_K, M*K, H] float32 partial accumulators of the down projection, with the
    routing weights ``tw`` [M*K] float32 and the experts' biases ``b2`` [E, H] (or None)."""
    m, k = topk_ids.shape
    h = out.shape[1]
    splits = 1 if ys.dim() == 2 else ys.shape[0]
    assert ys.shape[-2:] == (m * k, h) and ys.stride(-1) == 1 and out.stride(1) == 1
    assert splits == 1 or (tw is not None and tw.shape == (m * k,) and ys.dtype == torch.float32)
    if m == 0:
        return
    block_h = min(1024, triton.next_power_of_2(h))
    grid = (m, triton.cdiv(h, block_h))
    _topk_sum_kernel[grid](
        ys, topk_ids, tw if tw is not None else ys, b2 if b2 is not None else ys, out, h,
        num_experts, ys.stride(0) if splits > 1 else 0, ys.stride(-2),
        0 if b2 is None else b2.stride(0), out.stride(0),
        TOPK=k, SPLIT_K=splits, HAS_BIAS=b2 is not None, BLOCK_H=block_h,
        **launch_args(out.device),
    )  # fmt: skip
