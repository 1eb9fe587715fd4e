"""Rotary embedding in PyTorch: op ``rope``'s contract and its ``torch`` backend.

positions [T] index tables cos/sin [P, dim/2] (the model dtype, attention factor applied);
x [T, ..., dim] is rotated pairwise, pairs (x[2i], x[2i+1]) when ``interleave`` (DeepSeek's
rope) else (x[i], x[i + dim/2]) (GPT-OSS's), and laid out as (rotated first halves, rotated
second halves): the output transformers gives, so q.k products agree with it.
"""

from __future__ import annotations

import torch


def rope_torch(
    positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
) -> torch.Tensor:
    shape = (positions.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
    c = cos[positions].view(shape)  # [T, 1.., dim/2]
    s = sin[positions].view(shape)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
