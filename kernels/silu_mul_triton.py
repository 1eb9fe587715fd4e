"""The dense MLP's gated activation in one Triton launch: op ``silu_mul``, backend ``triton``.
Contract: ``silu_mul_reference.silu_mul_torch``, with the same roundings (silu rounded to the
model dtype, then the product); the exponential is Triton's, so a value may land one rounding
of the dtype away. The reference's two kernels become one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.dependent_launch import launch_args, pdl_start
from pdserve.kernels.rounding_triton import to_dtype_rne


@triton.jit
def _silu_mul_kernel(
    h_ptr, out_ptr, I, stride_h, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Row t, columns [c0, c0 + BLOCK): out = silu(gate) * up."""
    pdl_start(PDL)  # see kernels.dependent_launch
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < I
    g = tl.load(h_ptr + t * stride_h + c, mask=m, other=0.0)
    u = tl.load(h_ptr + t * stride_h + I + c, mask=m, other=0.0)
    dt = g.dtype
    gf = g.to(tl.float32)
    s = to_dtype_rne(gf / (1.0 + tl.exp(-gf)), dt).to(tl.float32)  # silu, rounded as torch's
    tl.store(out_ptr + t * stride_out + c, to_dtype_rne(s * u.to(tl.float32), dt), mask=m)


def silu_mul_triton(h: torch.Tensor) -> torch.Tensor:
    """h [T, 2I] (rows may be strided, last dim contiguous) -> [T, I]."""
    assert h.dim() == 2 and h.stride(-1) == 1 and h.shape[1] % 2 == 0, (h.shape, h.stride())
    t, i = h.shape[0], h.shape[1] // 2
    out = torch.empty((t, i), dtype=h.dtype, device=h.device)
    if t:
        block = min(1024, triton.next_power_of_2(i))
        p = launch_args(h.device)
        _silu_mul_kernel[(t, triton.cdiv(i, block))](
            h, out, i, h.stride(0), out.stride(0), BLOCK=block, num_warps=4, **p
        )
    return out
