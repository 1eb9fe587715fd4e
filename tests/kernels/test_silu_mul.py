"""silu_mul, Triton (interpreter on CPU, compiled on CUDA), against silu_mul_torch: both dtypes,
strided rows, a width that spans several blocks and ends mid-block, an empty batch."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.silu_mul_reference import silu_mul_torch
from pdserve.kernels.silu_mul_triton import silu_mul_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [48, 1408, 2600])  # V2-Lite's shared experts: 2 x 1408
def test_matches_the_reference(device, dtype, inter):
    g = torch.Generator().manual_seed(inter)
    h = (torch.randn(5, 2 * inter + 8, generator=g) * 4).to(dtype).to(device)[:, 4:-4]  # strided
    got = silu_mul_triton(h)
    want = silu_mul_torch(h)
    assert got.shape == (5, inter) and got.dtype == dtype
    # the exponential's last float32 bits may differ: one rounding of the dtype at most
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


def test_an_empty_batch(device):
    assert silu_mul_triton(torch.zeros(0, 64, device=device)).shape == (0, 32)
