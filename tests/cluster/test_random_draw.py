"""Random checkpoint values drawn on every core depend on the seed alone."""

from __future__ import annotations


def test_random_weights_depend_on_the_seed_not_on_the_thread_count(monkeypatch):
    import torch

    from pdserve.cluster import random_draw as cm
    from pdserve.kernels.mxfp4 import dequantize_mxfp4, unpack_fp4

    monkeypatch.setattr(cm, "PIECE", 1 << 10)  # many pieces

    def draw(threads: int):
        monkeypatch.setattr(cm.os, "cpu_count", lambda: threads)
        g = torch.Generator().manual_seed(5)
        return cm.normal((64, 96), 0.5, g, torch.float32), cm.mxfp4((8, 64, 256), 0.02, g)

    (w1, (q1, s1)), (w4, (q4, s4)) = draw(1), draw(4)
    assert torch.equal(w1, w4) and torch.equal(q1, q4) and torch.equal(s1, s4)
    assert 0.45 < w1.std() < 0.55
    counts = torch.bincount(unpack_fp4(q1).flatten().long(), minlength=16).float()
    assert counts.min() > 0.9 * counts.mean()  # every E2M1 code about as often
    assert 0.015 < dequantize_mxfp4(q1, s1, torch.float32).std() < 0.03
