"""MLA's rotations and latent-cache write in one Triton launch: op ``mla_kv_write``, backend
``triton``. Contract: ``mla_kv_write_reference.mla_kv_write_torch``: the rotations bit for bit
(``rope_triton.rotate``), the latent's norm as ``rms_norm_triton`` computes it (to a float32
rounding of the mean square). The reference's kernels (the norm, two rotations, a
concatenation, the indexed copy) become one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.dependent_launch import launch_args, pdl_start
from pdserve.kernels.rms_norm_triton import norm_row
from pdserve.kernels.rope_triton import rotate


@triton.jit
def _mla_kv_write_kernel(
    pos_ptr, q_ptr, ckv_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, out_ptr, H, eps,
    stride_qt, stride_qh, stride_ckv, stride_cache, stride_ot, stride_oh, stride_table,
    R: tl.constexpr, BLOCK_R: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, INTERLEAVE: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Token t, query heads [h0, h0 + BLOCK_H) rotated; the first head block also writes the
    token's cache row (normalized latent, rotated rope key)."""
    pdl_start(PDL)  # see kernels.dependent_launch
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    i = tl.arange(0, BLOCK_HALF)
    p = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cos_ptr + p * stride_table + i, mask=i < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + p * stride_table + i, mask=i < HALF, other=0.0)[None, :]
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    m = (h < H)[:, None] & (i < HALF)[None, :]  # [BH, BHALF]
    o1, o2 = rotate(q_ptr + t * stride_qt + h.to(tl.int64)[:, None] * stride_qh, m, i, cos, sin,
                    HALF, INTERLEAVE)  # fmt: skip
    out = out_ptr + t * stride_ot + h.to(tl.int64)[:, None] * stride_oh + i[None, :]
    tl.store(out, o1, mask=m)
    tl.store(out + HALF, o2, mask=m)
    if hb == 0:
        row = ckv_ptr + t * stride_ckv
        dst = cache_ptr + tl.load(slot_ptr + t).to(tl.int64) * stride_cache
        d = tl.arange(0, BLOCK_R)
        x = tl.load(row + d, mask=d < R, other=0.0)  # [BR] the latent
        tl.store(dst + d, norm_row(x, w_ptr, d, d < R, R, eps, False), mask=d < R)
        mk = (i < HALF)[None, :]  # [1, BHALF]
        k1, k2 = rotate(row + R + tl.zeros([1, 1], tl.int64), mk, i, cos, sin, HALF, INTERLEAVE)
        tl.store(dst + R + i[None, :], k1, mask=mk)
        tl.store(dst + R + HALF + i[None, :], k2, mask=mk)


def mla_kv_write_triton(
    positions: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleave: bool,
    cache_rows: torch.Tensor,
    slots: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``mla_kv_write_torch``; q_pe, ckv and ``out`` may be strided views
    (last dim contiguous)."""
    t, heads, rope = q_pe.shape
    r = norm_weight.shape[0]
    assert q_pe.stride(-1) == 1 and ckv.stride(-1) == 1 and cache_rows.stride(-1) == 1
    assert ckv.shape == (t, r + rope) and cache_rows.shape[1] == r + rope, (ckv.shape, r, rope)
    assert cos.dtype == q_pe.dtype and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    assert cache_rows.dtype == q_pe.dtype == ckv.dtype, (cache_rows.dtype, q_pe.dtype, ckv.dtype)
    # one position and one cache row (in [0, N): the kernel does not check) per token
    assert positions.shape == (t,) and slots.shape == (t,), (positions.shape, slots.shape, t)
    assert positions.stride(0) == 1 and slots.stride(0) == 1
    if out is None:
        out = torch.empty((t, heads, rope), dtype=q_pe.dtype, device=q_pe.device)
    assert out.shape == q_pe.shape and out.dtype == q_pe.dtype and out.stride(-1) == 1
    if t:
        block_h = min(16, triton.next_power_of_2(heads))
        _mla_kv_write_kernel[(t, triton.cdiv(heads, block_h))](
            positions, q_pe, ckv, norm_weight, cos, sin, cache_rows, slots, out, heads,
            float(eps), q_pe.stride(0), q_pe.stride(1), ckv.stride(0), cache_rows.stride(0),
            out.stride(0), out.stride(1), cos.stride(0),
            R=r, BLOCK_R=triton.next_power_of_2(r), HALF=rope // 2,
            BLOCK_HALF=triton.next_power_of_2(rope // 2), BLOCK_H=block_h,
            INTERLEAVE=interleave, num_warps=4, **launch_args(out.device),
            enable_fp_fusion=False,  # no FMA: torch rounds each product
        )  # fmt: skip
    return out
