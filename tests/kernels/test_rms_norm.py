"""rms_norm, Triton (interpreter on CPU, compiled on CUDA), against rms_norm_torch: both
scalings, with and without the residual add, strided rows, an empty batch; the torch path
against transformers' norms."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.rms_norm_reference import rms_norm_torch
from pdserve.kernels.rms_norm_triton import rms_norm_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("round_once", [False, True])
@pytest.mark.parametrize("d", [64, 576, 2880])  # a power of two, MLA's latent + rope, GPT-OSS's
def test_matches_the_reference(device, dtype, round_once, d):
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(5, d, generator=g) * 3).to(dtype).to(device)
    w = (1 + torch.randn(d, generator=g) * 0.1).to(dtype).to(device)
    got = rms_norm_triton(x, w, 1e-6, round_once)
    want = rms_norm_torch(x, w, 1e-6, round_once)
    assert got.dtype == dtype and got.shape == x.shape
    # float32: the mean square's summation order; bf16: a rounding of the normed value apart,
    # then scaled and rounded again (at most 2 ** -6 relative)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-6, atol=1e-3)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_residual_sum_is_exact_and_normed(device, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 384, generator=g).to(dtype).to(device)
    res = torch.randn(7, 384, generator=g).to(dtype).to(device)
    w = torch.rand(384, generator=g).to(dtype).to(device)
    got, total = rms_norm_triton(x, w, 1e-5, False, res)
    want, want_total = rms_norm_torch(x, w, 1e-5, False, res)
    assert torch.equal(total, want_total)  # the residual stream: rounded as torch's add rounds
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-6, atol=1e-3)
    torch.testing.assert_close(got, want, **tol)


def test_strided_rows_and_an_empty_batch(device):
    ckv = torch.randn(4, 512 + 64).to(device)  # MLA: the latent is a column range of a row
    w = torch.rand(512).to(device)
    got = rms_norm_triton(ckv[:, :512], w, 1e-6)
    torch.testing.assert_close(got, rms_norm_torch(ckv[:, :512], w, 1e-6), rtol=1e-5, atol=1e-5)
    assert rms_norm_triton(ckv[:0, :512], w, 1e-6).shape == (0, 512)


def test_the_reference_is_transformers_norms():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    x = torch.randn(6, 256).bfloat16() * 4
    for cls, round_once in ((DeepseekV3RMSNorm, False), (GptOssRMSNorm, True)):
        ref = cls(256, eps=1e-6).bfloat16()
        with torch.no_grad():
            ref.weight.copy_(torch.rand(256) + 0.5)
        got = rms_norm_torch(x, ref.weight, 1e-6, round_once)
        assert torch.equal(got, ref(x)), cls.__name__
