"""rope, Triton (interpreter on CPU, compiled on CUDA), against rope_torch bit for bit: split
halves (GPT-OSS) and interleaved pairs (DeepSeek), 2-d and 3-d inputs, strided head views,
positions in any order."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.rope_reference import rope_torch
from pdserve.kernels.rope_triton import rope_triton


def _tables(p: int, half: int, dtype, device):
    freqs = torch.arange(p).float()[:, None] * (1e4 ** (-torch.arange(half) / half))[None, :]
    return (freqs.cos() * 1.3).to(dtype).to(device), (freqs.sin() * 1.3).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [False, True])
def test_equals_the_reference(device, dtype, interleave):
    cos, sin = _tables(40, 32, dtype, device)
    pos = torch.tensor([3, 0, 39, 17, 17], device=device)
    q = torch.randn(5, 20, 64).to(dtype).to(device)  # 20 heads: two programs of 16, one partial
    got = rope_triton(pos, q, cos, sin, interleave)
    assert got.shape == q.shape and got.is_contiguous()
    assert torch.equal(got, rope_torch(pos, q, cos, sin, interleave))


def test_two_dim_input_and_a_strided_head_view(device):
    cos, sin = _tables(16, 32, torch.bfloat16, device)
    pos = torch.tensor([5, 6, 7], device=device)
    ckv = torch.randn(3, 512 + 64).bfloat16().to(device)
    k_pe = ckv[:, 512:]  # MLA's rope key: a column range of each row
    want = rope_torch(pos, k_pe, cos, sin, True)
    assert torch.equal(rope_triton(pos, k_pe, cos, sin, True), want)
    q = torch.randn(3, 4, 128 + 64).bfloat16().to(device)[..., 128:]  # q_pe of [T, H, nope+rope]
    assert torch.equal(rope_triton(pos, q, cos, sin, True), rope_torch(pos, q, cos, sin, True))
    assert rope_triton(pos[:0], q[:0], cos, sin, True).shape == (0, 4, 64)
