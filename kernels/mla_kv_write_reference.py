"""MLA's rotations and latent-cache write, in PyTorch: op ``mla_kv_write``'s contract and its
``torch`` backend.

For every token t: the query's rope part rotated (``rope_reference``), and cache row
``slots[t]`` set to (RMSNorm of the latent ``ckv[t, :r]`` (``rms_norm_reference``, no residual),
the rotated rope key ``ckv[t, r:]``): what ``MLAAttention`` does before attending.
"""

from __future__ import annotations

import torch

from pdserve.kernels.rms_norm_reference import rms_norm_torch
from pdserve.kernels.rope_reference import rope_torch


def mla_kv_write_torch(
    positions: torch.Tensor,  # [T]
    q_pe: torch.Tensor,  # [T, H, rope]
    ckv: torch.Tensor,  # [T, r + rope]: kv_a's latent, then its rope key
    norm_weight: torch.Tensor,  # [r]
    eps: float,
    cos: torch.Tensor,  # [P, rope / 2]
    sin: torch.Tensor,
    interleave: bool,
    cache_rows: torch.Tensor,  # [N, r + rope], written in place
    slots: torch.Tensor,  # [T] int64 rows of cache_rows, no repeats among real tokens
    out: torch.Tensor | None = None,  # [T, H, rope], may be strided: receives the result
) -> torch.Tensor:  # [T, H, rope] rotated q_pe (``out`` when given)
    r = norm_weight.shape[0]
    latent = rms_norm_torch(ckv[:, :r], norm_weight, eps)  # [T, r]
    k_pe = rope_torch(positions, ckv[:, r:], cos, sin, interleave)  # [T, rope]
    cache_rows.index_copy_(0, slots, torch.cat((latent, k_pe), dim=-1))
    rotated = rope_torch(positions, q_pe, cos, sin, interleave)
    return rotated if out is None else out.copy_(rotated)
