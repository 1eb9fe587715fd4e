"""A dense linear in PyTorch: op ``linear``'s contract and its ``torch`` backend. y = x W^T + b;
with ``silu_mul`` the weight is [gate; up] (2I rows) and the result silu(gate) * up [T, I], the
product and each elementwise step rounded to the model dtype as torch's kernels round them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.kernels.silu_mul_reference import silu_mul_torch


def linear_torch(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    *,
    silu_mul: bool = False,
) -> torch.Tensor:  # [T, N], or [T, N / 2] with silu_mul
    y = F.linear(x, weight, bias)
    return silu_mul_torch(y) if silu_mul else y
