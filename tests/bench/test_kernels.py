"""bench.kernels' moe_small sweep candidates: each one a config the kernel runs correctly, on
plain codes and on the fragment layout."""

from __future__ import annotations

import pytest
import torch

from pdserve.bench import kernels
from pdserve.kernels.moe_reference import SwiGLU, moe_mxfp4_torch
from pdserve.kernels.moe_triton_small_m import moe_small_triton
from tests.kernels.kernel_cases import random_moe, random_routing, rel_err


@pytest.mark.parametrize("gemm", ["gemm1", "gemm2"])
def test_every_small_m_candidate_runs_and_matches_the_reference(gemm):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # else the interpreter
    w = random_moe(4, 64, 32, dtype=torch.float32, device=device)
    ids, tw = random_routing(3, 4, 2, device=device, seed=1)
    x = torch.randn(3, 64, device=device)
    ref = moe_mxfp4_torch(x, w, ids, tw, SwiGLU())
    base = kernels._tiles((16, 32, 4, 1, 0))
    swapped = 0
    for cand in kernels.SWEEP_SMALL[gemm]:
        cfg = {"gemm1": base, "gemm2": base} | {gemm: kernels._tiles(cand)}
        swapped += cfg[gemm].get("SWAP", 0)
        assert rel_err(moe_small_triton(x, w, ids, tw, SwiGLU(), config=cfg), ref) < 1e-5, cand
    assert swapped == 2


@pytest.mark.parametrize("gemm", ["gemm1", "gemm2"])
def test_every_fragment_candidate_runs_and_matches_the_reference(gemm):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # else the interpreter
    w = random_moe(4, 128, 64, dtype=torch.float32, device=device)
    ids, tw = random_routing(3, 4, 2, device=device, seed=2)
    x = torch.randn(3, 128, device=device)
    ref = moe_mxfp4_torch(x, w, ids, tw, SwiGLU())
    w = w.interleaved_copy()
    base = kernels._tiles((64, 64, 4, 1, 0))
    for cand in kernels.SWEEP_FRAGMENT[gemm]:
        cfg = {"gemm1": base, "gemm2": base} | {gemm: kernels._tiles(cand)}
        assert rel_err(moe_small_triton(x, w, ids, tw, SwiGLU(), config=cfg), ref) < 1e-5, cand
