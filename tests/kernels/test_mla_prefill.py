"""mla_prefill, Triton: causal varlen attention over cached prefixes against mla_prefill_torch."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.mla_prefill_triton import mla_prefill_triton
from pdserve.kernels.mla_reference import mla_prefill_torch
from tests.kernels.kernel_cases import nan_like, poison_cuda_allocator, rel_err

SMALL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


def varlen(q_lens, k_lens, heads, dqk, dv, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, *q_lens]).cumsum(0).int().to(device)
    cu_k = torch.tensor([0, *k_lens]).cumsum(0).int().to(device)
    q = torch.randn(sum(q_lens), heads, dqk, generator=gen).to(dtype).to(device)
    k = torch.randn(sum(k_lens), heads, dqk, generator=gen).to(dtype).to(device)
    v = torch.randn(sum(k_lens), heads, dv, generator=gen).to(dtype).to(device)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize(
    "dtype, q_lens, k_lens, dqk, dv",
    [
        (torch.float32, [5, 1, 20, 17], [5, 9, 50, 17], 48, 32),  # tiny model: 48 vs 32
        (torch.bfloat16, [33, 2], [40, 70], 48, 32),  # chunks after cached prefixes
        (torch.float32, [16, 31], [16, 31], 32, 32),  # plain causal, power-of-2 Dqk
        (torch.bfloat16, [1, 1, 1], [1, 18, 33], 40, 24),  # one query per sequence
    ],
)
def test_matches_reference(device, dtype, q_lens, k_lens, dqk, dv):
    q, k, v, cu_q, cu_k = varlen(q_lens, k_lens, 2, dqk, dv, dtype, device, seed=len(q_lens))
    args = (q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), dqk**-0.5)
    out = mla_prefill_triton(*args, config=SMALL, out=nan_like((q.shape[0], 2, dv), dtype, device))
    assert rel_err(out, mla_prefill_torch(*args)) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_a_sequence_without_keys_and_empty_sequences(device):
    """The padding of a mixed-step graph: empty sequences, then queries with no key at all
    (their rows zero), after a sequence with a cached prefix; max_q past every sequence."""
    q_lens, k_lens = [7, 0, 0, 25], [19, 0, 0, 0]
    q, k, v, cu_q, cu_k = varlen(q_lens, k_lens, 2, 48, 32, torch.float32, device, seed=4)
    args = (q, k, v, cu_q, cu_k, 64, 64, 0.2)
    poisoned = nan_like((q.shape[0], 2, 32), q.dtype, device)
    out = mla_prefill_triton(*args, config=SMALL, out=poisoned)
    assert rel_err(out, mla_prefill_torch(*args)) < 1e-5
    assert out[7:].abs().max() == 0


def test_strided_views_and_default_config(device):
    # q and k as views into wider tensors (as after a split of a fused projection)
    q_lens, k_lens = [9, 4], [12, 30]
    big_q, big_k, v, cu_q, cu_k = varlen(q_lens, k_lens, 3, 64, 32, torch.float32, device)
    q, k = big_q[..., :48], big_k[..., :48]
    args = (q, k, v, cu_q, cu_k, 9, 30, 0.2)
    ref = mla_prefill_torch(*args)
    assert rel_err(mla_prefill_triton(*args, config=SMALL), ref) < 1e-5
    assert rel_err(mla_prefill_triton(*args), ref) < 1e-5


@pytest.mark.gpu
def test_deepseek_shapes_gpu():
    dev = torch.device("cuda")
    q_lens, k_lens = [512, 1, 77, 1024], [512, 900, 2000, 3000]
    q, k, v, cu_q, cu_k = varlen(q_lens, k_lens, 16, 192, 128, torch.bfloat16, dev)
    args = (q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), 192**-0.5)
    poison_cuda_allocator()
    out = mla_prefill_triton(*args, out=nan_like((q.shape[0], 16, 128), q.dtype, dev))
    assert rel_err(out, mla_prefill_torch(*args)) < 1e-2
