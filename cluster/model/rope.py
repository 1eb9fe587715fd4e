"""Rotary embedding of MLA's rope part: plain or YaRN, interleaved pairs or split halves.

The tables are computed with the same float32 expressions transformers uses, so cos/sin agree
bit for bit with its DeepseekV3 implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pdserve.cluster.config import RopeConfig, yarn_mscale
from pdserve.kernels.rope_reference import rope_torch


def inv_freq_and_attention_factor(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """[dim / 2] inverse frequencies and the factor applied to cos and sin."""
    base = rope.theta
    if rope.rope_type == "default":
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(
                factor, rope.mscale_all_dim
            )
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_positions), in the model dtype, applied by the
    worker's ``rope`` kernel (``kernels/rope_reference.py`` is the contract and the CPU path)."""

    def __init__(
        self,
        dim: int,
        max_positions: int,
        rope: RopeConfig,
        interleave: bool,
        dtype: torch.dtype,
        kernel: Callable = rope_torch,
    ) -> None:
        super().__init__()
        self.interleave, self.kernel = interleave, kernel
        inv_freq, attention_factor = inv_freq_and_attention_factor(rope, dim)
        freqs = torch.arange(max_positions).float()[:, None] * inv_freq[None, :]  # [P, dim/2]
        self.register_buffer("cos", (freqs.cos() * attention_factor).to(dtype), persistent=False)
        self.register_buffer("sin", (freqs.sin() * attention_factor).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, ..., dim] -> rotated, laid out as (rotated first halves, rotated second halves).

        Interleaved: pairs are (x[2i], x[2i+1]); otherwise (x[i], x[i + dim/2]). Both give the
        output transformers gives, so q.k products agree with it.
        """
        return self.kernel(positions, x, self.cos, self.sin, self.interleave)
