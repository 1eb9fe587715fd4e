"""RMSNorm with an optional residual add before it, in PyTorch: op ``rms_norm``'s contract and
its ``torch`` backend.

The norm is computed in float32 as transformers' DeepseekV3RMSNorm does (the normalized value
rounded to the model dtype, then scaled), or with ``round_once`` as GptOssRMSNorm does (scaled in
float32, rounded once). With ``residual``, the sum x + residual is rounded to the model dtype
first (the residual stream's value) and returned beside the norm.
"""

from __future__ import annotations

import torch


def rms_norm_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    round_once: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> norm [..., D]; with ``residual``: (norm(x + residual), x + residual)."""
    total = x if residual is None else x + residual
    h = total.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if round_once:
        out = (weight * h).to(x.dtype)  # bf16 weight * float32: float32
    else:
        out = weight * h.to(x.dtype)
    return out if residual is None else (out, total)
