"""StackedLinear: the checkpoint's parts (q_a_proj, kv_a_proj_with_mqa) loaded by their own
names into one weight, whose product is each part's own; in FP8 with their block scales
stacked (whole blocks before the last part), else as loaded."""

from __future__ import annotations

import pytest
import torch

from pdserve.cluster.model.stacked_linear import StackedLinear
from pdserve.kernels import KernelSet
from pdserve.kernels.device import H100, DeviceInfo
from pdserve.kernels.fp8_blocks import dequantize_fp8_blocks, quantize_fp8_blocks
from tests.kernels.kernel_cases import assert_fp8_gemm_close

PARTS = (("q_a_proj", 256), ("kv_a_proj_with_mqa", 80))  # the last part a partial block
CPU = KernelSet.resolve(DeviceInfo.cpu(), "decode")


def _stored(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {n: quantize_fp8_blocks(torch.randn(rows, 384, generator=g) * 0.05) for n, rows in PARTS}


@pytest.mark.parametrize("bias", [False, True])
def test_parts_land_in_their_rows_and_multiply_as_separate_linears(bias):
    g = torch.Generator().manual_seed(1)
    weights = {n: torch.randn(rows, 384, generator=g) for n, rows in PARTS}
    biases = {n: torch.randn(rows, generator=g) for n, rows in PARTS}
    lin = StackedLinear(384, PARTS, dtype=torch.float32, bias=bias)
    assert lin.fp8_parts() == ()
    for n in reversed([n for n, _ in PARTS]):  # any order
        lin.load_weight(f"{n}.weight", weights[n])
        if bias:
            lin.load_weight(f"{n}.bias", biases[n])
    assert lin.missing_weights() == []
    x = torch.randn(5, 384, generator=g)
    q, kv = lin(x).split((256, 80), dim=1)
    for n, got in (("q_a_proj", q), ("kv_a_proj_with_mqa", kv)):
        want = torch.nn.functional.linear(x, weights[n], biases[n] if bias else None)
        # float32 sums over K=384 in whatever order the CPU's BLAS blocks the two shapes
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="unexpected stacked linear tensor 'o_proj.weight'"):
        lin.load_weight("o_proj.weight", weights["q_a_proj"])
    with pytest.raises(ValueError, match="checkpoint shape"):
        lin.load_weight("q_a_proj.weight", weights["kv_a_proj_with_mqa"])


@pytest.mark.parametrize(
    "kernels",
    [CPU, KernelSet.resolve(H100, "decode", overrides={"linear_fp8": "triton"})],
    ids=["dequantized", "fp8-gemm"],
)
def test_fp8_parts_stack_with_their_block_scales(kernels):
    """The FP8 GEMM case runs on the GPU where there is one, else under the interpreter."""
    dev = torch.device("cuda" if torch.cuda.is_available() and kernels is not CPU else "cpu")
    stored = _stored()
    with dev:
        lin = StackedLinear(384, PARTS, dtype=torch.float32, fp8=((128, 128), kernels))
    assert lin.fp8_parts() == ("q_a_proj", "kv_a_proj_with_mqa")
    assert lin.weight.shape == (336, 384) and lin.weight_scale_inv.shape == (3, 3)
    for n, (w, s) in stored.items():
        lin.load_weight(f"{n}.weight", w)
        lin.load_weight(f"{n}.weight_scale_inv", s)
    assert lin.missing_weights() == []
    lin.post_load()
    x = torch.randn(7, 384, generator=torch.Generator().manual_seed(2)).to(dev)
    w = torch.cat([stored[n][0] for n, _ in PARTS])
    s = torch.cat([stored[n][1] for n, _ in PARTS])
    if kernels is CPU:  # the weight dequantized at load: each part's own product
        dense = torch.cat([dequantize_fp8_blocks(*stored[n]) for n, _ in PARTS])
        torch.testing.assert_close(lin(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    else:  # the FP8 GEMM over the stacked weight and scales (interpreted here)
        assert_fp8_gemm_close(lin(x), x, w, s)


def test_a_part_of_partial_blocks_before_another_takes_them_dequantized():
    parts = (("q_a_proj", 64), ("kv_a_proj_with_mqa", 80))  # 64 rows: half a block
    lin = StackedLinear(384, parts, dtype=torch.float32, fp8=((128, 128), CPU))
    assert lin.fp8_parts() == () and lin.weight.dtype == torch.float32
    assert lin.expected == ("q_a_proj.weight", "kv_a_proj_with_mqa.weight")
