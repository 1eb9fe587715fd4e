"""PyTorch MXFP4 MoE: the CPU path and the oracle every MoE kernel is tested against.

Contract shared by every MoE backend (``MoeFn``)::

    out = moe(x, weights, topk_ids, topk_weights, act)

    x             [M, H]            model dtype
    weights       MoeWeights        w13 [E, 2I, H/2] u8 (rows: gate then up), s13 [E, 2I, H/32] u8,
                                    w2 [E, H, I/2] u8, s2 [E, H, I/32] u8, optional biases
    topk_ids      [M, K] int        expert ids; ids outside [0, E) contribute nothing
    topk_weights  [M, K] float32    routing weights, applied to each expert's down projection
    act           SwiGLU            h = g * sigmoid(alpha * g) * (u + beta), g = min(gate, limit),
                                    u = clamp(up, -limit, limit); plain SiLU gating: alpha=1, beta=0
    out           [M, H]            model dtype: sum_k w_k * down_k(h_k)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.kernels.mxfp4 import (
    dequantize_mxfp4,
    fragment_layout_fits,
    interleave_mxfp4,
)

SMALL_SCALE_MAX = 128  # E8M0 byte of 2**1: the largest scale the one-multiply decode takes


@dataclass(frozen=True)
class SwiGLU:
    """The gated activation: plain SiLU-gated (DeepSeek) by default, clamped for GPT-OSS."""

    alpha: float = 1.0  # GPT-OSS: 1.702
    beta: float = 0.0  # added to the up half; GPT-OSS: 1.0
    limit: float | None = None  # clamp bound; GPT-OSS: 7.0

    @property
    def is_plain(self) -> bool:
        return self.alpha == 1.0 and self.beta == 0.0 and self.limit is None

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.is_plain:
            return F.silu(gate) * up
        if self.limit is not None:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(-self.limit, self.limit)
        return gate * torch.sigmoid(self.alpha * gate) * (up + self.beta)


@dataclass(frozen=True)
class MoeWeights:
    """Routed experts of one layer (one tensor-parallel shard), MXFP4."""

    w13: torch.Tensor  # [E, 2I, H/2] u8, gate rows [0, I), up rows [I, 2I)
    s13: torch.Tensor  # [E, 2I, H/32] u8 E8M0
    w2: torch.Tensor  # [E, H, I/2] u8
    s2: torch.Tensor  # [E, H, I/32] u8 E8M0
    b13: torch.Tensor | None = None  # [E, 2I] model dtype (GPT-OSS)
    b2: torch.Tensor | None = None  # [E, H] model dtype (GPT-OSS)
    # codes and scales in the MMA-fragment layout (``mxfp4.interleave_mxfp4``): the Triton
    # kernels' layout where a backend asks for it (``Backend.mxfp4_codes``); others read plain
    interleaved: bool = False
    # every E8M0 scale byte at most 128 (2**1), as trained weights' are: the fragment decode then
    # multiplies once per pair of values (``moe_triton_common.fast_dequant``); set with the layout
    small_scales: bool = False

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden(self) -> int:
        return self.w2.shape[1]

    @property
    def intermediate(self) -> int:
        return self.w13.shape[1] // 2

    def interleavable(self) -> bool:
        """Whether both GEMMs' codes fit the fragment layout (rows % 16, columns % 64)."""
        return fragment_layout_fits(2 * self.intermediate, self.hidden) and fragment_layout_fits(
            self.hidden, self.intermediate
        )

    def interleaved_copy(self) -> MoeWeights:
        """These experts with codes and scales in the fragment layout (new tensors)."""
        assert not self.interleaved
        w13, s13 = interleave_mxfp4(self.w13.clone(), self.s13.clone())
        w2, s2 = interleave_mxfp4(self.w2.clone(), self.s2.clone())
        small = scales_fit_one_mul(s13, s2)
        return dataclasses.replace(
            self, w13=w13, s13=s13, w2=w2, s2=s2, interleaved=True, small_scales=small
        )

    def expert_nbytes(self) -> int:
        """Bytes one expert occupies (packed weights + scales + biases): what decode reads."""
        n = sum(t[0].numel() * t.element_size() for t in (self.w13, self.s13, self.w2, self.s2))
        for b in (self.b13, self.b2):
            if b is not None:
                n += b[0].numel() * b.element_size()
        return n


def scales_fit_one_mul(*scales: torch.Tensor) -> bool:
    """Whether every E8M0 scale byte is at most 128 (``MoeWeights.small_scales``)."""
    return all(s.numel() == 0 or int(s.max()) <= SMALL_SCALE_MAX for s in scales)


def moe_mxfp4_torch(
    x: torch.Tensor,
    weights: MoeWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    act: SwiGLU,
) -> torch.Tensor:
    """Loop over the experts that were hit; dequantize each one's weights and run it."""
    m, _ = x.shape
    e, inter = weights.num_experts, weights.intermediate
    out = torch.zeros_like(x)  # [M, H]
    if m == 0:
        return out
    flat_ids = topk_ids.reshape(-1).long()  # [M*K]
    valid = (flat_ids >= 0) & (flat_ids < e)
    k = topk_ids.shape[1]
    for expert in torch.unique(flat_ids[valid]).tolist():
        slots = (flat_ids == expert).nonzero().squeeze(-1)  # slot = token * K + k
        tokens, ks = slots // k, slots % k
        c13, s13 = weights.w13[expert], weights.s13[expert]
        c2, s2 = weights.w2[expert], weights.s2[expert]
        if weights.interleaved:
            c13, s13 = interleave_mxfp4(c13.clone(), s13.clone(), inverse=True)
            c2, s2 = interleave_mxfp4(c2.clone(), s2.clone(), inverse=True)
        w13 = dequantize_mxfp4(c13, s13, x.dtype)  # [2I, H]
        w2 = dequantize_mxfp4(c2, s2, x.dtype)  # [H, I]
        h = F.linear(x[tokens], w13, None if weights.b13 is None else weights.b13[expert])
        h = act(h[:, :inter], h[:, inter:])  # [n, I]
        y = F.linear(h, w2, None if weights.b2 is None else weights.b2[expert])  # [n, H]
        y = y * topk_weights[tokens, ks, None]  # float32 weights promote, as transformers does
        out.index_add_(0, tokens, y.to(out.dtype))
    return out
