"""A dense linear for a decode step's few rows in Triton: op ``linear``, backend ``triton``.
Contract: ``linear_reference.linear_torch``.

At one to 16 tokens a projection only streams its weight, and cuBLAS's kernels for these
shapes leave much of the copy rate unused where the weight has few rows (DeepSeek-V2-Lite's
576-row ``kv_a_proj_with_mqa`` at 0.4 TB/s on an H100). Here each program takes BLOCK_N
output rows and walks the whole reduction in BLOCK_K steps: the token rows padded to one
16-row MMA tile, the weight tile its other operand, so the tensor cores' work is incidental
and the loads are pipelined. Given ``silu_mul`` a program also takes the matching up rows and
writes silu(gate) * up itself, the activation's own launch and the [T, 2I] intermediate gone.
Float32 sums, in a different order than cuBLAS's: results may differ from ``linear_torch`` by
a rounding of the dtype. More rows, other layouts and dtypes go to ``linear_torch`` (cuBLAS,
then the ``silu_mul`` kernel given).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from pdserve.kernels import triton_configs
from pdserve.kernels.dependent_launch import launch_args, pdl_start
from pdserve.kernels.linear_reference import linear_torch
from pdserve.kernels.moe_triton_common import acc_zeros, interpreting, mma_xw
from pdserve.kernels.rounding_triton import to_dtype_rne

MAX_ROWS = 16  # tokens one MMA tile holds; more go to cuBLAS


@triton.jit(do_not_specialize=["N"])  # N is a tensor (its int64 product below) even at 1
def _skinny_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, T, N, K, stride_x, stride_w, stride_y,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr, SWAP: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program p: output columns [p * BLOCK_N, +BLOCK_N) of every row (up rows N + those
    with SILU_MUL). SWAP: the weight tile is the MMA's left operand."""
    pdl_start(PDL)  # see kernels.dependent_launch
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.arange(0, 16)
    nmask = n < N
    tmask = t < T
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_w  # [BN, 1]
    up_rows = w_rows + N.to(tl.int64) * stride_w  # the up half's rows: N past the gate's
    acc = acc_zeros(16, BLOCK_N, SWAP)
    acc_up = acc_zeros(16, BLOCK_N, SWAP)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        x = tl.load(
            x_ptr + t[:, None] * stride_x + k[None, :],
            mask=tmask[:, None] & kmask[None, :],
            other=0.0,
        )  # [16, BK]
        wmask = nmask[:, None] & kmask[None, :]
        w = tl.load(w_rows + k[None, :], mask=wmask, other=0.0)  # [BN, BK]
        acc = mma_xw(x, w, acc, UPCAST, SWAP)
        if SILU_MUL:
            w_up = tl.load(up_rows + k[None, :], mask=wmask, other=0.0)
            acc_up = mma_xw(x, w_up, acc_up, UPCAST, SWAP)
    if SWAP:
        acc = tl.trans(acc)  # [16, BN]
        acc_up = tl.trans(acc_up)
    dt = y_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if SILU_MUL:  # torch's roundings: the product, silu, then the gated product
        gate = to_dtype_rne(acc, dt).to(tl.float32)
        silu = to_dtype_rne(gate / (1.0 + tl.exp(-gate)), dt).to(tl.float32)
        out = to_dtype_rne(silu * to_dtype_rne(acc_up, dt).to(tl.float32), dt)
    else:
        out = to_dtype_rne(acc, dt)
    y = y_ptr + t[:, None] * stride_y + n[None, :]
    tl.store(y, out, mask=tmask[:, None] & nmask[None, :])


def linear_triton(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    *,
    silu_mul: Callable[[torch.Tensor], torch.Tensor] | None = None,  # [T, 2I] -> [T, I]
    config: dict | None = None,
) -> torch.Tensor:  # [T, N], or [T, N / 2] with silu_mul
    """``linear_torch``'s result; this kernel for at most ``MAX_ROWS`` rows of a CUDA tensor
    with a row-major bf16 or fp16 weight (float32 too under the interpreter).
    ``config`` overrides the tiles (``triton_configs.SKINNY_LINEAR``)."""
    t, k = x.shape
    gated = silu_mul is not None
    n = weight.shape[0] // (2 if gated else 1)
    # float32 on a GPU goes to cuBLAS: the Hopper tiles stage 2-byte elements (245 KB of
    # shared memory in float32 under the gated activation, past the 227 KB an H100 has)
    dtypes = (torch.bfloat16, torch.float16) + (() if x.is_cuda else (torch.float32,))
    kernel_fits = (
        0 < t <= MAX_ROWS
        and (x.is_cuda or interpreting())
        and x.dtype == weight.dtype in dtypes
        and x.stride(1) == 1 and weight.stride(1) == 1
        and not (gated and bias is not None)
    )  # fmt: skip
    if not kernel_fits:
        return linear_torch(x, weight, bias, silu_mul=silu_mul)
    assert weight.shape[1] == k and weight.shape[0] % (2 if gated else 1) == 0, weight.shape
    keys = triton_configs.device_keys(x.device)
    cfg = config or triton_configs.skinny_linear_config(keys, gated, n)
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    _skinny_linear_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, weight, bias if bias is not None else weight, y, t, n, k,
        x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], HAS_BIAS=bias is not None,
        SILU_MUL=gated, SWAP=bool(cfg["SWAP"]),
        UPCAST=interpreting() or x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_args(x.device),
    )  # fmt: skip
    return y
