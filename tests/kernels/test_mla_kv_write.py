"""mla_kv_write, Triton (interpreter on CPU, compiled on CUDA), against mla_kv_write_torch:
strided query and latent views as the attention layer passes them, both rope layouts, a latent
width that is not a power of two, rows outside the slots left alone, an empty batch."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.mla_kv_write_reference import mla_kv_write_torch
from pdserve.kernels.mla_kv_write_triton import mla_kv_write_triton


def _case(device, dtype, t, heads, r, rope, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, heads, 24 + rope, generator=g).to(dtype).to(device)  # nope 24, then rope
    qkv = torch.randn(t, 40 + r + rope, generator=g).to(dtype).to(device)  # q_a 40, then ckv
    w = (1 + torch.randn(r, generator=g) * 0.1).to(dtype).to(device)
    ang = torch.randn(32, rope // 2, generator=g)
    cos, sin = ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)
    positions = torch.randint(0, 32, (t,), generator=g).to(device)
    slots = torch.randperm(3 * t + 2, generator=g)[:t].to(device)
    cache = torch.randn(3 * t + 2, r + rope, generator=g).to(dtype).to(device)
    return positions, q[..., 24:], qkv[:, 40:], w, cos, sin, cache, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("t, heads, r, rope", [(5, 3, 48, 16), (2, 20, 512, 64)])
def test_matches_the_reference(device, dtype, interleave, t, heads, r, rope):
    positions, q_pe, ckv, w, cos, sin, cache, slots = _case(device, dtype, t, heads, r, rope, t)
    want_cache = cache.clone()
    want = mla_kv_write_torch(
        positions, q_pe, ckv, w, 1e-6, cos, sin, interleave, want_cache, slots
    )
    got = mla_kv_write_triton(positions, q_pe, ckv, w, 1e-6, cos, sin, interleave, cache, slots)
    assert got.shape == q_pe.shape and got.dtype == dtype
    assert torch.equal(got, want)  # the rotations bit for bit
    assert torch.equal(cache[:, r:], want_cache[:, r:])  # rotated keys; other rows untouched
    others = torch.ones(cache.shape[0], dtype=torch.bool, device=device)
    others[slots] = False
    assert torch.equal(cache[others], want_cache[others])
    # the latent's norm: the mean square's summation order apart (see test_rms_norm)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-6, atol=1e-3)
    torch.testing.assert_close(cache[:, :r], want_cache[:, :r], **tol)


def test_an_empty_batch(device):
    positions, q_pe, ckv, w, cos, sin, cache, slots = _case(device, torch.float32, 0, 2, 32, 8, 0)
    before = cache.clone()
    out = mla_kv_write_triton(positions, q_pe, ckv, w, 1e-6, cos, sin, True, cache, slots)
    assert out.shape == (0, 2, 8) and torch.equal(cache, before)


@pytest.mark.parametrize("write", [mla_kv_write_torch, mla_kv_write_triton])
def test_out_a_strided_view_receives_the_rotations(device, write):
    """``out``: the rope columns of a [T, H, r + rope] query, as the decode step passes them;
    the latent columns beside them are left alone."""
    positions, q_pe, ckv, w, cos, sin, cache, slots = _case(device, torch.bfloat16, 3, 4, 48, 16, 7)
    want = mla_kv_write_torch(positions, q_pe, ckv, w, 1e-6, cos, sin, False, cache.clone(), slots)
    q_full = torch.full((3, 4, 48 + 16), 5.0, dtype=torch.bfloat16, device=device)
    got = write(positions, q_pe, ckv, w, 1e-6, cos, sin, False, cache, slots, out=q_full[..., 48:])
    assert got.data_ptr() == q_full[..., 48:].data_ptr()
    assert torch.equal(q_full[..., 48:], want)
    assert bool((q_full[..., :48] == 5).all())
