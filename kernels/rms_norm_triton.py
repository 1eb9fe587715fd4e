"""RMSNorm in one Triton launch, optionally with the residual add before it: op ``rms_norm``,
backend ``triton``. Contract: ``rms_norm_reference.rms_norm_torch`` (same roundings: the sum
rounded to the model dtype, the norm in float32, then transformers' DeepseekV3RMSNorm or
GptOssRMSNorm scaling). Its float32 reduction order differs from torch's, so results agree to a
float32 rounding of the mean square, not bit for bit.

A decode step runs the norm's eight elementwise and reduction kernels per use, two uses per
layer plus the residual adds: this is one kernel per use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.dependent_launch import launch_args, pdl_start
from pdserve.kernels.rounding_triton import to_dtype_rne


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, D, eps,
    stride_x, stride_res, stride_out, stride_sum,
    HAS_RES: tl.constexpr, ROUND_ONCE: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """One row: s = x (+ res, rounded to the dtype); out = norm(s) * w."""
    pdl_start(PDL)  # see kernels.dependent_launch
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    x = tl.load(x_ptr + row * stride_x + d, mask=dm, other=0.0)
    dtype = x.dtype
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_res + d, mask=dm, other=0.0)
        x = to_dtype_rne(x.to(tl.float32) + r.to(tl.float32), dtype)
        tl.store(sum_ptr + row * stride_sum + d, x, mask=dm)
    tl.store(out_ptr + row * stride_out + d, norm_row(x, w_ptr, d, dm, D, eps, ROUND_ONCE), mask=dm)


@triton.jit
def norm_row(x, w_ptr, d, dm, D, eps, ROUND_ONCE: tl.constexpr):
    """One row x [BLOCK_D] (zeros past D) -> its RMSNorm times the weight, in x's dtype."""
    dtype = x.dtype
    h = x.to(tl.float32)
    inv = 1.0 / tl.sqrt_rn(tl.sum(h * h, axis=0) / D + eps)
    h = h * inv
    w = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if ROUND_ONCE:
        out = w * h
    else:
        out = w * to_dtype_rne(h, dtype).to(tl.float32)
    return to_dtype_rne(out, dtype)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    round_once: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] (rows may be strided, last dim contiguous) -> norm [T, D]; with ``residual``
    [T, D]: (norm(x + residual), x + residual)."""
    assert x.dim() == 2 and x.stride(-1) == 1, (x.shape, x.stride())
    t, d = x.shape
    out = torch.empty((t, d), dtype=x.dtype, device=x.device)
    total = None
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1
        total = torch.empty((t, d), dtype=x.dtype, device=x.device)
    if t:
        block = triton.next_power_of_2(d)
        _rms_norm_kernel[(t,)](
            x, residual if residual is not None else x, weight, out,
            total if total is not None else out, d, float(eps),
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            total.stride(0) if total is not None else 0,
            HAS_RES=residual is not None, ROUND_ONCE=round_once, BLOCK_D=block,
            num_warps=min(16, max(1, block // 256)), **launch_args(x.device),
        )  # fmt: skip
    return out if total is None else (out, total)
