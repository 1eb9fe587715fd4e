"""The FP8 block linear through cuBLAS (``torch._scaled_mm`` with DeepSeek's recipe). On CPU:
the operands laid out as cuBLAS reads them (activation codes under Triton's interpreter), fed to
a float64 emulation of the block-scaled product, equal the reference; the switch to the Triton
kernel below the crossover and for shapes cuBLAS does not take. On an sm_90 GPU: the whole path
against the reference."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels import fp8_gemm_scaled_mm as sm
from pdserve.kernels.fp8_gemm_triton import GROUP, act_quant_torch, fp8_block_linear_torch
from tests.kernels.kernel_cases import fp8_case

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(m: int, n: int, k: int, seed: int = 0):
    return fp8_case(m, n, k, DEV, seed)


def _cublas_emulated(a, b, sa, sb) -> torch.Tensor:
    """What cuBLAS computes from the operands: per 128-deep K block, the E4M3 product scaled by
    the activation row's and the weight block's scales, summed (float64)."""
    kb = sa.shape[1]
    n = b.shape[1]
    out = 0
    for j in range(kb):
        ks = slice(j * GROUP, (j + 1) * GROUP)
        part = a[:, ks].double() @ b[ks, :].double()  # [Mp, N]
        col_scale = sb[j].double().repeat_interleave(GROUP)[:n]  # [N]: block n // 128
        out = out + part * sa[:, j, None].double() * col_scale[None, :]
    return out


@pytest.mark.parametrize("m, n, k", [(1, 256, 512), (6, 576, 1024), (9, 128, 1536)])
def test_operands_are_laid_out_as_cublas_reads_them(m, n, k):
    x, w, s = _case(m, n, k, seed=m)
    p = sm.prepare((w, s, torch.float32))
    assert p.cublas_fits
    a, b, sa, sb = sm.operands(x, p)
    rows = -(-m // 4) * 4
    kb = k // GROUP
    # cuBLASLt's layouts: M padded to 4, scales of A column-major, B column-major
    assert a.shape == (rows, k) and a.stride() == (k, 1) and a.dtype == torch.float8_e4m3fn
    assert sa.shape == (rows, kb) and sa.stride() == (1, rows)
    assert b.shape == (k, n) and b.stride() == (1, k)
    assert sb.shape == (kb, -(-n // GROUP)) and sb.stride() == (1, kb) and kb % 4 == 0
    # the rows M holds are the reference's codes and scales
    qa, qs = act_quant_torch(x)
    assert torch.equal(a[:m].view(torch.uint8), qa.view(torch.uint8))
    assert torch.equal(sa[:m], qs)
    got = _cublas_emulated(a[:m], b, sa[:m], sb)
    want = fp8_block_linear_torch(x, w, s).double()  # float32 sums
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, k", [(256, 384), (200, 512), (256, 640)])
def test_weights_cublas_does_not_take_run_the_triton_kernel(n, k, monkeypatch):
    x, w, s = _case(3, n, k)
    monkeypatch.setattr(sm, "scaled_mm_from_m", lambda n, k: 1)
    monkeypatch.setattr(sm, "scaled_mm_linear", _refuse)
    p = sm.prepare((w, s, torch.bfloat16))
    assert not p.cublas_fits  # K not in whole groups of 4 blocks, or N not in 16s
    out = sm.linear(x.bfloat16(), p)
    assert out.shape == (3, n)
    torch.testing.assert_close(
        out.float(), fp8_block_linear_torch(x.bfloat16(), w, s).float(), rtol=1e-2, atol=1e-2
    )


def test_batches_below_the_crossover_and_float32_run_the_triton_kernel(monkeypatch):
    x, w, s = _case(5, 256, 512)
    monkeypatch.setattr(sm, "scaled_mm_linear", _refuse)
    monkeypatch.setattr(sm, "scaled_mm_from_m", lambda n, k: 6)  # looked up at prepare
    p = sm.prepare((w, s, torch.float32))
    assert sm.linear(x.bfloat16(), p).shape == (5, 256)  # below: Triton
    monkeypatch.setattr(sm, "scaled_mm_from_m", lambda n, k: 1)
    p = sm.prepare((w, s, torch.float32))
    assert sm.linear(x, p).dtype == torch.float32  # float32 activations: Triton
    with pytest.raises(AssertionError, match="cuBLAS"):
        sm.linear(x.bfloat16(), p)  # at the crossover, bf16, a weight it takes: cuBLAS


def test_crossover_follows_the_measured_shapes():
    from pdserve.kernels.triton_configs import scaled_mm_from_m

    assert scaled_mm_from_m(576, 7168) == scaled_mm_from_m(1536, 7168) == 512  # narrow: Triton
    assert scaled_mm_from_m(2112, 7168) == 512  # MLA's stacked q_a + kv_a counts as narrow
    assert scaled_mm_from_m(7168, 16384) == scaled_mm_from_m(7168, 18432) == 1  # deep: cuBLAS
    assert scaled_mm_from_m(24576, 1536) == scaled_mm_from_m(36864, 7168) == 64


def _refuse(x, p):
    raise AssertionError("cuBLAS called")


needs_sm90 = pytest.mark.skipif(
    DEV != "cuda" or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU"
)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("m, n, k", [(1, 256, 512), (5, 576, 7168), (130, 1536, 7168),
                                     (600, 7168, 2048), (64, 24576, 1536)])  # fmt: skip
def test_cublas_block_scaled_gemm_matches_the_reference_on_the_gpu(m, n, k):
    assert sm.unavailable() is None, sm.unavailable()
    x, w, s = _case(m, n, k, seed=k + m)
    x = x.bfloat16()
    got = sm.scaled_mm_linear(x, sm.prepare((w, s, torch.bfloat16)))
    assert got.shape == (m, n) and got.dtype == torch.bfloat16 and got.is_contiguous()
    want = fp8_block_linear_torch(x, w, s)
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < 1e-2, err  # bf16 output rounding and Hopper's FP8 accumulator
