"""FP8 block weights: scales per 128x128 block (partial at the edges), values that come back
exactly when they are on E4M3's grid, errors naming bad shapes, and the error of storing random
FP8 experts as MXFP4 (the loader's conversion)."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.fp8_blocks import (
    E4M3_MAX,
    dequantize_fp8_blocks,
    expand_scales,
    quantize_fp8_blocks,
)
from pdserve.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4, random_mxfp4


def test_scales_cover_partial_edge_blocks():
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    full = expand_scales(scale, torch.Size((130, 200)))
    assert full.shape == (130, 200)
    assert full[127, 127] == 1 and full[127, 128] == 2 and full[128, 0] == 3 and full[129, 199] == 4
    with pytest.raises(ValueError, match=r"scales of shape \(2, 2\) .* \(300, 200\).* \(3, 2\)"):
        expand_scales(scale, torch.Size((300, 200)))
    with pytest.raises(ValueError, match="2-D"):
        expand_scales(scale, torch.Size((2, 130, 200)))


def test_quantize_then_dequantize_is_within_e4m3_rounding_and_exact_on_its_grid():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 260, generator=g) * torch.logspace(-3, 1, 260)  # columns of all sizes
    codes, scale = quantize_fp8_blocks(w)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (3, 3)
    back = dequantize_fp8_blocks(codes, scale)
    # E4M3 keeps 3 mantissa bits: half an ulp is 1/16 of the value, relative
    tiles = expand_scales(scale, w.shape)
    assert ((back - w).abs() <= w.abs() / 16 + tiles * 2**-9).all()
    assert codes.float().abs().max() == E4M3_MAX  # each block's largest maps to 448
    again, scale2 = quantize_fp8_blocks(back)
    assert torch.equal(dequantize_fp8_blocks(again, scale2), back)  # on the grid: unchanged
    zero_codes, zero_scale = quantize_fp8_blocks(torch.zeros(10, 10))
    assert zero_scale.item() == 1 and not zero_codes.float().any()


def test_power_of_two_scales_keep_mxfp4_values_exact():
    q, s = random_mxfp4((192, 256), 0.02, torch.Generator().manual_seed(1))
    v = dequantize_mxfp4(q, s)
    codes, scale = quantize_fp8_blocks(v, power_of_two=True)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())
    back = dequantize_fp8_blocks(codes, scale)
    assert torch.equal(back, v)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(back)), v)  # MXFP4 at load: lossless


def test_only_e4m3_weights_are_dequantized():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_fp8_blocks(torch.zeros(4, 4, dtype=torch.float8_e5m2), torch.ones(1, 1))


def test_random_fp8_experts_stored_as_mxfp4_lose_what_mxfp4_loses():
    """Random FP8 experts (normal values, amax/448 block scales, as a trained checkpoint's are
    not MXFP4-representable): MXFP4's 2-bit mantissa and shared exponent give a relative RMS
    error of about 10-20% of the weights; anything far outside that is a bug."""
    from pdserve.cluster.model.weights import ExpertConversion

    g = torch.Generator().manual_seed(2)
    conv = ExpertConversion()
    for _ in range(4):
        codes, scale = quantize_fp8_blocks(torch.randn(512, 384, generator=g) * 0.02)
        conv.measure(dequantize_fp8_blocks(codes, scale))
    assert conv.tensors == 4
    assert 0.05 < conv.relative_rms < 0.25, conv.relative_rms
