"""linear, Triton (interpreter on CPU, compiled on CUDA), against linear_torch: 1-16 rows, row
counts and widths that end mid-tile, three dtypes (float32 on a GPU goes to cuBLAS), a bias,
the gated activation, strided activations, tiles with the weight as either MMA operand, and
the hand-off to the reference (and to the given silu_mul kernel) where the kernel does not
apply."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels import linear_triton as module
from pdserve.kernels import triton_configs
from pdserve.kernels.linear_reference import linear_torch
from pdserve.kernels.linear_triton import MAX_ROWS, linear_triton
from pdserve.kernels.silu_mul_reference import silu_mul_torch


def _inputs(rows, n, k, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k + 8, generator=g)[:, 3 : 3 + k]  # strided rows
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    return x.to(dtype).to(device), w.to(dtype).to(device), b.to(dtype).to(device)


def _tol(dtype):  # float32 sums in another order, then one rounding of the dtype
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize(("n", "k"), [(40, 96), (576, 200)])
def test_matches_the_reference(device, dtype, rows, n, k):
    x, w, b = _inputs(rows, n, k, dtype, device, seed=rows * n)
    for bias in (None, b):
        got = linear_triton(x, w, bias)
        assert got.shape == (rows, n) and got.dtype == dtype
        torch.testing.assert_close(got, linear_torch(x, w, bias), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 16])
def test_the_gated_activation_in_the_epilogue(device, dtype, rows):
    inter, k = 72, 136  # ends mid-tile in both dimensions
    x, w, _ = _inputs(rows, 2 * inter, k, dtype, device, seed=rows)
    got = linear_triton(x, w, silu_mul=silu_mul_torch)
    assert got.shape == (rows, inter)
    want = linear_torch(x, w, silu_mul=silu_mul_torch)
    torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("swap", [0, 1])
def test_either_mma_operand_order(device, monkeypatch, swap):
    tiles = dict(BLOCK_N=64 if swap else 32, BLOCK_K=64, num_warps=4, num_stages=2, SWAP=swap)
    table = {"default": {"linear": tiles, "silu_mul": tiles}}
    monkeypatch.setattr(triton_configs, "SKINNY_LINEAR", table)
    x, w, _ = _inputs(3, 2 * 80, 160, torch.bfloat16, device, seed=swap)
    tol = _tol(torch.bfloat16)
    torch.testing.assert_close(linear_triton(x, w), linear_torch(x, w), **tol)
    gated = dict(silu_mul=silu_mul_torch)
    torch.testing.assert_close(linear_triton(x, w, **gated), linear_torch(x, w, **gated), **tol)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the kernel launched")


def test_more_rows_a_bias_with_the_activation_and_no_rows_take_the_reference(device, monkeypatch):
    """Without a launch: past a tile's rows, a bias beside the gated activation (the given
    silu_mul kernel then runs, here a marked one), an empty batch."""
    monkeypatch.setattr(module, "_skinny_linear_kernel", _NoLaunch())
    x, w, b = _inputs(MAX_ROWS + 1, 24, 32, torch.bfloat16, device, seed=0)
    torch.testing.assert_close(linear_triton(x, w, b), linear_torch(x, w, b))
    marked = []

    def act(h):
        marked.append(h.shape)
        return silu_mul_torch(h)

    got = linear_triton(x[:3], w, b, silu_mul=act)
    torch.testing.assert_close(got, linear_torch(x[:3], w, b, silu_mul=silu_mul_torch))
    assert marked == [(3, 24)]
    assert linear_triton(x[:0], w).shape == (0, 24)


def test_hopper_tiles_by_output_rows():
    """On sm_90 plain projections of WIDE_LINEAR_N output rows and more take the wide tiles,
    gate/up its own whatever the width; the default table has one plain tile for every width."""
    from pdserve.kernels.triton_configs import (
        SKINNY_LINEAR,
        WIDE_LINEAR_N,
        skinny_linear_config,
    )

    hopper, cpu = ("NVIDIA H100 80GB HBM3", "sm90", "default"), ("default",)
    tiles = SKINNY_LINEAR["sm90"]
    assert skinny_linear_config(hopper, False, WIDE_LINEAR_N - 1) == tiles["linear"]
    assert skinny_linear_config(hopper, False, WIDE_LINEAR_N) == tiles["linear_wide"]
    assert skinny_linear_config(hopper, True, 4 * WIDE_LINEAR_N) == tiles["silu_mul"]
    assert tiles["linear_wide"]["BLOCK_N"] > tiles["linear"]["BLOCK_N"]
    plain = SKINNY_LINEAR["default"]["linear"]
    assert skinny_linear_config(cpu, False, 7168) == skinny_linear_config(cpu, False, 16) == plain
