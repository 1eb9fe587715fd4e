"""moe_large, Triton grouped GEMM: the expert alignment, and the kernel against moe_mxfp4_torch."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.moe_reference import SwiGLU, moe_mxfp4_torch
from pdserve.kernels.moe_triton_grouped import align_by_expert, moe_grouped_triton
from tests.kernels.kernel_cases import (
    GPT_OSS_ACT,
    REAL_MOE_SHAPES,
    nan_like,
    poison_cuda_allocator,
    random_moe,
    random_routing,
    rel_err,
)


def tiles(bm=16, bn=16, bk=32, group=2):
    c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=4, num_stages=1)
    return {"gemm1": c, "gemm2": c}


@pytest.mark.parametrize("m, k, e, bm", [(1, 1, 4, 16), (37, 3, 8, 16), (50, 2, 3, 32)])
def test_align_by_expert(m, k, e, bm):
    ids, _ = random_routing(m, e, k, seed=m, invalid=True)
    slots, bexp = align_by_expert(ids, e, bm)
    s = m * k
    assert slots.shape == (bexp.shape[0] * bm,) and bexp.dtype == torch.int32
    flat = ids.reshape(-1)
    seen = []
    for b, expert in enumerate(bexp.tolist()):
        block = slots[b * bm : (b + 1) * bm].tolist()
        real = [x for x in block if x < s]
        if expert == e:  # past the padded total: nothing but pads
            assert not real
            continue
        assert real and all(flat[x] == expert for x in real)
        assert block == real + [s] * (bm - len(real))  # pads only at the end of a run
        seen += real
    valid = [x for x in range(s) if 0 <= flat[x] < e]
    assert sorted(seen) == valid  # every valid slot exactly once, no invalid one
    assert bexp.tolist() == sorted(bexp.tolist())  # expert-major order


@pytest.mark.parametrize(
    "m, dtype, act, bias",
    [
        (1, torch.float32, SwiGLU(), False),
        (33, torch.float32, GPT_OSS_ACT, True),
        (40, torch.bfloat16, SwiGLU(), True),
        (17, torch.bfloat16, GPT_OSS_ACT, False),
    ],
)
def test_matches_reference(device, m, dtype, act, bias):
    w = random_moe(8, 96, 64, bias=bias, dtype=dtype, device=device, seed=m)
    ids, tw = random_routing(m, 8, 3, device=device, seed=m, invalid=True)
    x = torch.randn(m, 96, device=device).to(dtype)
    # H = 96 is not a multiple of BLOCK_K = 64 (gemm1 steps by 32); I = 64 over several N tiles
    out = moe_grouped_triton(
        x, w, ids, tw, act, config=tiles(16, 16, 64), out=nan_like(x.shape, dtype, device)
    )
    ref = moe_mxfp4_torch(x, w, ids, tw, act)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("interleaved", [False, True])
def test_several_scale_groups_per_tile(device, interleaved):
    w = random_moe(4, 256, 128, bias=True, device=device, seed=9)
    ids, tw = random_routing(24, 4, 2, device=device, seed=9, invalid=True)
    x = torch.randn(24, 256, device=device).bfloat16()
    ref = moe_mxfp4_torch(x, w, ids, tw, GPT_OSS_ACT)  # plain codes
    w = w.interleaved_copy() if interleaved else w
    out = moe_grouped_triton(x, w, ids, tw, GPT_OSS_ACT, config=tiles(16, 32, 128))
    assert rel_err(out, ref) < 2e-2


def test_all_ids_invalid_gives_zeros(device):
    w = random_moe(4, 64, 32, bias=True, dtype=torch.float32, device=device)
    x = torch.randn(5, 64, device=device)
    ids = torch.full((5, 2), -1, device=device)
    out = moe_grouped_triton(x, w, ids, torch.ones(5, 2, device=device), SwiGLU(), config=tiles())
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", REAL_MOE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("m", [129, 2048])
@pytest.mark.parametrize("interleaved", [False, True])
def test_real_shapes_gpu(shape, m, interleaved):
    dev = torch.device("cuda")
    w = random_moe(shape.experts, shape.hidden, shape.inter, bias=shape.bias, device=dev, seed=m)
    ids, tw = random_routing(m, shape.experts, shape.top_k, device=dev, seed=m, invalid=True)
    x = torch.randn(m, shape.hidden, device=dev).bfloat16()
    ref = moe_mxfp4_torch(x, w, ids, tw, shape.act)
    w = w.interleaved_copy() if interleaved else w
    poison_cuda_allocator()
    out = moe_grouped_triton(x, w, ids, tw, shape.act, out=nan_like(x.shape, x.dtype, dev))
    assert rel_err(out, ref) < 2e-2
