"""The FP8 block-scaled linear (Triton; under the interpreter on CPU) against its PyTorch
reference: activation codes and scales bit for bit, outputs to float32 summation order (on a
GPU, to the precision of Hopper's FP8 accumulator), at shapes with partial 128-blocks in M, N
and K."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.fp8_blocks import dequantize_fp8_blocks
from pdserve.kernels.fp8_gemm_triton import (
    act_quant,
    act_quant_torch,
    fp8_block_linear_torch,
    fp8_block_linear_triton,
)
from tests.kernels.kernel_cases import assert_fp8_gemm_close, fp8_case

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(m: int, n: int, k: int, seed: int = 0):
    return fp8_case(m, n, k, DEV, seed)


@pytest.mark.parametrize("m, k", [(1, 128), (5, 130), (33, 300)])
def test_activation_codes_and_scales_match_the_reference_exactly(m, k):
    x, _, _ = _case(m, 8, k)
    q, s = act_quant(x)
    rq, rs = act_quant_torch(x)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("m, n, k", [(1, 256, 256), (7, 200, 130), (40, 130, 384), (70, 64, 128)])
def test_block_linear_matches_the_reference(m, n, k):
    x, w, s = _case(m, n, k, seed=m)
    got = fp8_block_linear_triton(x, w, s)
    assert got.shape == (m, n) and got.dtype == x.dtype
    assert_fp8_gemm_close(got, x, w, s)
    # and near the unquantized product: activations' E4M3 rounding only
    exact = x @ dequantize_fp8_blocks(w.cpu(), s.cpu()).to(DEV).T
    assert ((got - exact).norm() / exact.norm()) < 0.05


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_k_split_in_pieces_sums_to_the_reference(splits):
    x, w, s = _case(5, 200, 900, seed=splits)  # 8 K blocks, the last partial: uneven pieces
    assert_fp8_gemm_close(fp8_block_linear_triton(x, w, s, splits=splits), x, w, s)


def test_k_is_split_only_when_few_tiles_leave_sms_idle(monkeypatch):
    from pdserve.kernels import fp8_gemm_triton

    monkeypatch.setattr(fp8_gemm_triton, "_num_sms", lambda device: 132)  # an H200's
    gpu = torch.device("cuda")
    assert fp8_gemm_triton.split_k(1, 576, 56, gpu) == 14  # kv_a_proj at decode: 9 tiles
    assert fp8_gemm_triton.split_k(1, 1536, 56, gpu) == 5  # q_a_proj: 24 tiles
    assert fp8_gemm_triton.split_k(1, 576, 8, gpu) == 2  # a short K: pieces of 4 blocks at least
    assert fp8_gemm_triton.split_k(1, 7168, 128, gpu) == 1  # o_proj: 112 tiles already
    assert fp8_gemm_triton.split_k(2048, 36864, 56, gpu) == 1  # prefill: tiles to spare


def test_bfloat16_activations_and_an_empty_batch():
    x, w, s = _case(9, 128, 256, seed=3)
    got = fp8_block_linear_triton(x.bfloat16(), w, s)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(
        got.float(), fp8_block_linear_torch(x.bfloat16(), w, s).float(), rtol=1e-2, atol=1e-2
    )
    assert fp8_block_linear_triton(x[:0], w, s).shape == (0, 128)
