"""Rotary embedding in one Triton launch: op ``rope``, backend ``triton``. Contract:
``rope_reference.rope_torch``, bit for bit (each product, sum and difference rounded to the
model dtype as PyTorch's elementwise kernels round them). The reference's nine kernels (two
table gathers, four products, a sum, a difference, a concatenation) become one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.rounding_triton import to_dtype_rne


@triton.jit
def rotate(row, m, i, cos, sin, HALF: tl.constexpr, INTERLEAVE: tl.constexpr):
    """Pairs of the rows at ``row`` [B, 1] pointers (``m`` [B, BLOCK_HALF] in bounds, ``i``
    [BLOCK_HALF]) rotated by cos / sin [1, BLOCK_HALF]: (x1 cos - x2 sin, x2 cos + x1 sin),
    each product, sum and difference rounded to the rows' dtype as torch rounds them (compile
    with enable_fp_fusion=False)."""
    if INTERLEAVE:
        x1 = tl.load(row + 2 * i[None, :], mask=m, other=0.0)
        x2 = tl.load(row + 2 * i[None, :] + 1, mask=m, other=0.0)
    else:
        x1 = tl.load(row + i[None, :], mask=m, other=0.0)
        x2 = tl.load(row + HALF + i[None, :], mask=m, other=0.0)
    dt = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    cos, sin = cos.to(tl.float32), sin.to(tl.float32)
    x1c = to_dtype_rne(x1 * cos, dt).to(tl.float32)  # each product rounded, as torch's are
    x2s = to_dtype_rne(x2 * sin, dt).to(tl.float32)
    x2c = to_dtype_rne(x2 * cos, dt).to(tl.float32)
    x1s = to_dtype_rne(x1 * sin, dt).to(tl.float32)
    return to_dtype_rne(x1c - x2s, dt), to_dtype_rne(x2c + x1s, dt)


@triton.jit
def _rope_kernel(
    x_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, H,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_table,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERLEAVE: tl.constexpr,
):  # fmt: skip
    """Token t, heads [h0, h0 + BLOCK_H): out = (x1 cos - x2 sin, x2 cos + x1 sin)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    m = (h < H)[:, None] & (i < HALF)[None, :]  # [BH, BHALF]
    p = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cos_ptr + p * stride_table + i, mask=i < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + p * stride_table + i, mask=i < HALF, other=0.0)[None, :]
    row = x_ptr + t * stride_xt + h.to(tl.int64)[:, None] * stride_xh
    o1, o2 = rotate(row, m, i, cos, sin, HALF, INTERLEAVE)
    out = out_ptr + t * stride_ot + h.to(tl.int64)[:, None] * stride_oh + i[None, :]
    tl.store(out, o1, mask=m)
    tl.store(out + HALF, o2, mask=m)


def rope_triton(
    positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
) -> torch.Tensor:
    """positions [T], x [T, dim] or [T, H, dim] (last dim contiguous), cos/sin [P, dim/2] in
    x's dtype -> rotated [T, (H,) dim], contiguous: (rotated first halves, second halves)."""
    x3 = x.unsqueeze(1) if x.dim() == 2 else x  # [T, H, dim]
    assert x3.dim() == 3 and x3.stride(-1) == 1, (x.shape, x.stride())
    assert cos.dtype == x.dtype and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    t, h, dim = x3.shape
    half = dim // 2
    out = torch.empty((t, h, dim), dtype=x.dtype, device=x.device)
    if t:
        block_h = min(16, triton.next_power_of_2(h))
        _rope_kernel[(t, triton.cdiv(h, block_h))](
            x3, positions, cos, sin, out, h,
            x3.stride(0), x3.stride(1), out.stride(0), out.stride(1), cos.stride(0),
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_H=block_h,
            INTERLEAVE=interleave, num_warps=4,
            enable_fp_fusion=False,  # no FMA: torch rounds each product
        )  # fmt: skip
    return out.view(x.shape)
