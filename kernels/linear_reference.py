"""A dense linear in PyTorch: op ``linear``'s contract and its ``torch`` backend. y = x W^T + b;
given ``silu_mul`` (the worker's kernel of that op) the weight is [gate; up] (2I rows) and the
result silu(gate) * up [T, I], the product and each elementwise step rounded to the model dtype
as torch's kernels round them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def linear_torch(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    *,
    silu_mul: Callable[[torch.Tensor], torch.Tensor] | None = None,  # [T, 2I] -> [T, I]
) -> torch.Tensor:  # [T, N], or [T, N / 2] with silu_mul
    y = F.linear(x, weight, bias)
    return silu_mul(y) if silu_mul is not None else y
