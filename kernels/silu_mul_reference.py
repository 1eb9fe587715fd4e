"""The dense MLP's gated activation in PyTorch: op ``silu_mul``'s contract and its ``torch``
backend: silu(gate) * up over the two halves of the gate/up product, each rounded to the model
dtype as torch's two elementwise kernels round them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul_torch(h: torch.Tensor) -> torch.Tensor:
    """h [T, 2I] (gate columns, then up) -> [T, I]."""
    i = h.shape[-1] // 2
    return F.silu(h[:, :i]) * h[:, i:]
