"""FlashInfer SM90 MoE adapter: the pure-torch reorder/padding, checked on CPU.

The FlashInfer call itself needs flashinfer's fused_moe_90 module and an SM90 GPU; its
correctness and speed check is ``bench/flashinfer_check.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.kernels import REGISTRY, moe_flashinfer
from pdserve.kernels.device import H100
from pdserve.kernels.moe_flashinfer import emulate, reorder_pad, undo_reorder_pad
from pdserve.kernels.moe_reference import SwiGLU, moe_mxfp4_torch
from pdserve.kernels.mxfp4 import dequantize_mxfp4
from tests.kernels.kernel_cases import GPT_OSS_ACT, random_moe, random_routing, rel_err


@pytest.mark.parametrize("h, i, bias", [(96, 64, True), (128, 160, False), (2880 // 10, 32, True)])
def test_reorder_pad_layout(h, i, bias):
    w = random_moe(3, h, i, bias=bias, dtype=torch.float32)
    fw = reorder_pad(w)
    hp, ip = -(-h // 128) * 128, -(-i // 128) * 128
    assert fw.w13.shape == (3, 2 * ip, hp // 2) and fw.s13.shape == (3, 2 * ip, hp // 32)
    assert fw.w2.shape == (3, hp, ip // 2) and fw.s2.shape == (3, hp, ip // 32)
    d13 = dequantize_mxfp4(fw.w13, fw.s13)  # [E, 2Ip, Hp]
    d2 = dequantize_mxfp4(fw.w2, fw.s2)  # [E, Hp, Ip]
    ref13 = dequantize_mxfp4(w.w13, w.s13)  # [E, 2I, H] rows [gate; up]
    # FlashInfer order: up half first, gate half second, each padded to Ip rows
    assert torch.equal(d13[:, :i, :h], ref13[:, i:])
    assert torch.equal(d13[:, ip : ip + i, :h], ref13[:, :i])
    assert torch.equal(d2[:, :h, :i], dequantize_mxfp4(w.w2, w.s2))
    # the padding is exact zeros (zero codes under a finite scale)
    pad13 = d13.clone()
    pad13[:, :i, :h] = 0
    pad13[:, ip : ip + i, :h] = 0
    assert not pad13.any() and d2[:, h:].abs().sum() == 0 and d2[:, :, i:].abs().sum() == 0
    # undoing the permutation gives back the original bytes
    back = undo_reorder_pad(fw)
    for name in ("w13", "s13", "w2", "s2", "b13", "b2"):
        a, b = getattr(back, name), getattr(w, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    if bias:
        assert torch.equal(fw.b13[:, :i], w.b13[:, i:]) and torch.equal(
            fw.b13[:, ip : ip + i], w.b13[:, :i]
        )
        assert not fw.b13[:, i:ip].any() and not fw.b2[:, h:].any()


@pytest.mark.parametrize("act, bias", [(SwiGLU(), False), (GPT_OSS_ACT, True)])
def test_up_gate_emulation_matches_reference(act, bias):
    # GPT-OSS-like: hidden 288 and intermediate 96 are not multiples of 128, so both get padded
    w = random_moe(4, 288, 96, bias=bias, dtype=torch.float32, seed=5)
    ids, tw = random_routing(6, 4, 2, seed=6, invalid=True)
    x = torch.randn(6, 288)
    got = emulate(x, reorder_pad(w), ids, tw, act)
    assert rel_err(got, moe_mxfp4_torch(x, w, ids, tw, act)) < 1e-5


def test_one_bias_only_keeps_layout():
    w = random_moe(2, 96, 32, bias=True, dtype=torch.float32)
    fw = reorder_pad(dataclasses.replace(w, b2=None))
    assert fw.b2 is None and fw.b13.shape == (2, 256)


def test_unavailable_names_the_reason_and_registry_falls_back(monkeypatch):
    monkeypatch.delenv("PDSERVE_FLASHINFER_ALLOW_JIT", raising=False)
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        why = moe_flashinfer.unavailable()
        assert why is not None and "flashinfer" in why
        assert REGISTRY.select("moe_large", H100, "prefill").backend.name == "triton_interleaved"
        with pytest.raises(ValueError, match="not importable"):  # named, it says why not
            REGISTRY.select("moe_large", H100, "prefill", override="flashinfer_cutlass")
    else:  # pragma: no cover - only where flashinfer is installed
        assert (
            moe_flashinfer.unavailable() is None or "fused_moe_90" in moe_flashinfer.unavailable()
        )
