"""The MXFP4 weight tile on chip (``mxfp4_tile``) against ``dequantize_mxfp4``, bit for bit, in
both code layouts (interpreter on CPU, inline PTX on CUDA)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from pdserve.kernels.moe_reference import SMALL_SCALE_MAX
from pdserve.kernels.moe_triton_common import interpreting
from pdserve.kernels.mxfp4 import dequantize_mxfp4, interleave_mxfp4
from pdserve.kernels.mxfp4_tile import ONE_MUL, code_ptrs, code_views, load_codes


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, o_ptr, stride_wn, stride_sn, FAST: tl.constexpr, INTERLEAVED: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    w_ptrs, s_ptrs, ok = code_ptrs(w_ptr, s_ptr, 0, BN, stride_wn, stride_sn, INTERLEAVED, BN, BK)
    v = load_codes(w_ptrs, s_ptrs, ok, 0, BK, tl.bfloat16, FAST, INTERLEAVED, BN, BK, False)
    tl.store(o_ptr + tl.arange(0, BN)[:, None] * BK + tl.arange(0, BK)[None, :], v)


@pytest.mark.parametrize("interleaved, one_mul", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("bn, bk, warps", [(16, 64, 4), (32, 128, 4), (64, 256, 8), (128, 64, 2)])
def test_dequant_tile_is_exact(device, bn, bk, warps, interleaved, one_mul):
    """The on-chip MXFP4 -> bf16 tile (inline PTX on CUDA) against dequantize_mxfp4, bit for bit,
    every code in every nibble and a different scale per 32-group (sign of zero included), in
    both code layouts, and with one multiply per pair (scales up to 128) on the fragment one."""
    if one_mul and interpreting():
        pytest.skip("the interpreter decodes without PTX: the case above covers it")
    gen = torch.Generator().manual_seed(bn + bk)
    w = torch.randint(0, 256, (1, bn, bk // 2), dtype=torch.uint8, generator=gen)
    top = SMALL_SCALE_MAX if one_mul else 191  # the exact range of each fast path
    s = torch.randint(100, top, (1, bn, bk // 32), dtype=torch.uint8, generator=gen)
    # the PTX paths' subnormal outputs at scale 0 (checked on the GPU; on the CPU, 2)
    s[0, 0, 0], s[0, -1, -1] = 0 if interleaved and not interpreting() else 2, top
    ref = dequantize_mxfp4(w[0], s[0], torch.bfloat16)
    if interleaved:
        w, s = interleave_mxfp4(w, s)
    out = torch.empty(bn, bk, dtype=torch.bfloat16, device=device)
    codes, scales, _, stride_wn, _, stride_sn = code_views(w.to(device), s.to(device), interleaved)
    fast = 0 if interpreting() else ONE_MUL if one_mul else 1
    _dequant_kernel[(1,)](
        codes, scales, out, stride_wn, stride_sn, FAST=fast, INTERLEAVED=interleaved, BN=bn,
        BK=bk, num_warps=warps,
    )  # fmt: skip
    assert torch.equal(out.cpu().view(torch.int16), ref.view(torch.int16))
