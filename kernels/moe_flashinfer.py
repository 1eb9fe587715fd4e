"""FlashInfer's SM90 CUTLASS W4A16 fused MoE: op ``moe_large``, backend ``flashinfer_cutlass``.

Follows the recipe of ``cutlass_fused_moe(..., use_w4_group_scaling=True)`` (FlashInfer >= 0.6.10):
fc1 rows in ``[up; gate]`` halves (ours are ``[gate; up]``), hidden and intermediate padded to
multiples of 128 (each half padded on its own, so the gate/up boundary moves to the padded
size), weights and E8M0 scales passed once through the SM90 interleave helpers, x padded to the
padded hidden size and the output trimmed. Padding is zero codes with scale 2**0, so padded
weights are exact zeros and padded intermediate units output SwiGLU(0, 0) = 0.

The reordering and padding are plain torch (``reorder_pad``), unit-tested on CPU together with
a torch emulation of the ``[up; gate]`` semantics (``emulate``). The FlashInfer call itself needs
the ``fused_moe_90`` module, whose JIT build takes about 45 minutes on 16 cores; ``pdserve
build-kernels`` (``flashinfer_aot``) builds the part this adapter calls ahead of time.
``unavailable`` names what is missing so that the registry falls back to the Triton MoE. Set
PDSERVE_FLASHINFER_ALLOW_JIT=1 to accept the full build on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from pdserve.kernels.moe_reference import MoeWeights, SwiGLU
from pdserve.kernels.mxfp4 import E8M0_BIAS, dequantize_mxfp4

MODULE = "fused_moe_90"  # what FlashInfer names the SM90 CUTLASS MoE module
ALIGN = 128  # the SM90 scale interleave packs 4 groups of 32 per K tile: K % 128 == 0


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass(frozen=True)
class FlashinferMoeWeights:
    """One layer's experts in FlashInfer's layout (padded; interleaved once ``prepare`` ran)."""

    w13: torch.Tensor  # [E, 2*Np, Kp/2] u8, rows [up; gate], each half Np = round_up(I, 128)
    s13: torch.Tensor  # [E, 2*Np, Kp/32] u8 E8M0
    w2: torch.Tensor  # [E, Kp, Np/2] u8
    s2: torch.Tensor  # [E, Kp, Np/32] u8 E8M0
    b13: torch.Tensor | None  # [E, 2*Np] bf16, [up; gate]
    b2: torch.Tensor | None  # [E, Kp] bf16
    hidden: int  # unpadded H
    intermediate: int  # unpadded I
    interleaved: bool = False


def _pad(t: torch.Tensor, rows: int, cols: int, value: int) -> torch.Tensor:
    """Pad the last two dims of t up to (rows, cols) with value."""
    return F.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]), value=value)


def reorder_pad(weights: MoeWeights) -> FlashinferMoeWeights:
    """Our [gate; up] experts -> FlashInfer's [up; gate] with H and I padded to 128 (pure torch)."""
    assert not weights.interleaved, "FlashInfer reads plain MXFP4 codes (Backend.mxfp4_codes)"
    h, i = weights.hidden, weights.intermediate
    kp, np_ = round_up(h, ALIGN), round_up(i, ALIGN)
    one = E8M0_BIAS  # scale 2**0 on padding, whose codes are zero
    gate_w, up_w = weights.w13[:, :i], weights.w13[:, i:]  # [E, I, H/2] each
    gate_s, up_s = weights.s13[:, :i], weights.s13[:, i:]
    w13 = torch.cat([_pad(up_w, np_, kp // 2, 0), _pad(gate_w, np_, kp // 2, 0)], dim=1)
    s13 = torch.cat([_pad(up_s, np_, kp // 32, one), _pad(gate_s, np_, kp // 32, one)], dim=1)
    w2 = _pad(weights.w2, kp, np_ // 2, 0)  # [E, Kp, Np/2]
    s2 = _pad(weights.s2, kp, np_ // 32, one)
    b13 = b2 = None
    if weights.b13 is not None:
        gb, ub = weights.b13[:, :i], weights.b13[:, i:]
        b13 = torch.cat([F.pad(ub, (0, np_ - i)), F.pad(gb, (0, np_ - i))], dim=1)
    if weights.b2 is not None:
        b2 = F.pad(weights.b2, (0, kp - h))
    return FlashinferMoeWeights(
        w13.contiguous(), s13.contiguous(), w2.contiguous(), s2.contiguous(), b13, b2, h, i
    )


def undo_reorder_pad(fw: FlashinferMoeWeights) -> MoeWeights:
    """Inverse of ``reorder_pad`` (before interleaving): for tests."""
    assert not fw.interleaved
    h, i = fw.hidden, fw.intermediate
    np_ = fw.w13.shape[1] // 2
    up_w, gate_w = fw.w13[:, :i, : h // 2], fw.w13[:, np_ : np_ + i, : h // 2]
    up_s, gate_s = fw.s13[:, :i, : h // 32], fw.s13[:, np_ : np_ + i, : h // 32]
    b13 = None
    if fw.b13 is not None:
        b13 = torch.cat([fw.b13[:, np_ : np_ + i], fw.b13[:, :i]], dim=1)
    return MoeWeights(
        w13=torch.cat([gate_w, up_w], dim=1),
        s13=torch.cat([gate_s, up_s], dim=1),
        w2=fw.w2[:, :h, : i // 2],
        s2=fw.s2[:, :h, : i // 32],
        b13=b13,
        b2=None if fw.b2 is None else fw.b2[:, :h],
    )


def emulate(
    x: torch.Tensor,
    fw: FlashinferMoeWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    act: SwiGLU,
) -> torch.Tensor:
    """What the FlashInfer kernel computes on padded [up; gate] weights, in torch (for tests)."""
    assert not fw.interleaved
    m, h = x.shape
    kp = fw.w2.shape[1]
    np_ = fw.w13.shape[1] // 2
    xp = F.pad(x, (0, kp - h))  # [M, Kp]
    out = torch.zeros(m, kp, dtype=torch.float32, device=x.device)
    for t in range(m):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if not 0 <= e < fw.w13.shape[0]:
                continue
            w13 = dequantize_mxfp4(fw.w13[e], fw.s13[e], x.dtype)  # [2Np, Kp]
            w2 = dequantize_mxfp4(fw.w2[e], fw.s2[e], x.dtype)  # [Kp, Np]
            fc1 = F.linear(xp[t], w13, None if fw.b13 is None else fw.b13[e].to(x.dtype))
            up, gate = fc1[:np_], fc1[np_:]  # FlashInfer's order
            y = F.linear(act(gate, up), w2, None if fw.b2 is None else fw.b2[e].to(x.dtype))
            out[t] += topk_weights[t, j] * y.float()
    return out[:, :h].to(x.dtype)


def unavailable() -> str | None:
    """Why the FlashInfer SM90 MoE cannot run here, or None."""
    try:
        from flashinfer.fused_moe import (  # noqa: F401
            cutlass_fused_moe,
            interleave_moe_scales_for_sm90_mixed_gemm,
            interleave_moe_weights_for_sm90_mixed_gemm,
        )
    except ImportError as err:
        return f"flashinfer >= 0.6.10 with the SM90 interleave helpers is not importable ({err})"
    if os.environ.get("PDSERVE_FLASHINFER_ALLOW_JIT") == "1":
        return None
    try:  # where build_and_load looks, without making the spec (that writes 154 sources)
        from flashinfer.jit import env as jit_env

        found = [
            d / MODULE / f"{MODULE}.so"
            for d in (jit_env.FLASHINFER_AOT_DIR, jit_env.FLASHINFER_JIT_DIR)
        ]
    except Exception as err:  # any failure of the probe means we cannot rely on the module
        return f"cannot probe flashinfer's {MODULE} module ({type(err).__name__}: {err})"
    if any(p.exists() for p in found):
        return None
    return (
        f"flashinfer's {MODULE} module is in neither {found[0].parent.parent} nor the JIT cache: "
        "build it once with `pdserve build-kernels` (nvcc, no GPU needed; about 16 minutes on "
        "2 cores), or set PDSERVE_FLASHINFER_ALLOW_JIT=1 to accept a 45-minute build on first use"
    )


def prepare(weights: MoeWeights) -> FlashinferMoeWeights:
    """Reorder, pad, cast biases to bf16 and interleave once, at load time (CUDA tensors)."""
    from flashinfer.fused_moe import (
        interleave_moe_scales_for_sm90_mixed_gemm as interleave_scales,
    )
    from flashinfer.fused_moe import (
        interleave_moe_weights_for_sm90_mixed_gemm as interleave_weights,
    )

    fw = reorder_pad(weights)
    e, two_np, kp = fw.w13.shape[0], fw.w13.shape[1], fw.w2.shape[1]
    if (fw.b13 is None) != (fw.b2 is None):  # the kernel takes both biases or neither
        zeros = torch.zeros(e, two_np if fw.b13 is None else kp, device=fw.w13.device)
        fw = replace(fw, b13=zeros) if fw.b13 is None else replace(fw, b2=zeros)
    return replace(
        fw,
        w13=interleave_weights(fw.w13, "fp4"),
        w2=interleave_weights(fw.w2, "fp4"),
        s13=interleave_scales(fw.s13, group_size=32),
        s2=interleave_scales(fw.s2, group_size=32),
        b13=None if fw.b13 is None else fw.b13.to(torch.bfloat16).contiguous(),
        b2=None if fw.b2 is None else fw.b2.to(torch.bfloat16).contiguous(),
        interleaved=True,
    )


def moe_flashinfer(
    x: torch.Tensor,
    fw: FlashinferMoeWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    act: SwiGLU,
) -> torch.Tensor:
    """Same contract as ``moe_mxfp4_torch``, on weights from ``prepare``; bf16 activations."""
    from flashinfer.fused_moe import cutlass_fused_moe
    from flashinfer.fused_moe.core import ActivationType

    if x.dtype != torch.bfloat16:
        raise ValueError(f"the FlashInfer W4A16 MoE takes bf16 activations, got {x.dtype}")
    if not fw.interleaved or x.shape[1] != fw.hidden:
        raise ValueError(f"x {tuple(x.shape)} needs prepared weights of hidden {fw.hidden}")
    m = x.shape[0]
    e = fw.w13.shape[0]
    kp = fw.w2.shape[1]
    valid = (topk_ids >= 0) & (topk_ids < e)
    # invalid ids contribute nothing: route them to expert 0 with weight 0
    ids = torch.where(valid, topk_ids, 0).to(torch.int32)
    scales = torch.where(valid, topk_weights.float(), 0.0)
    swiglu = {}
    if not act.is_plain:
        limit = float("inf") if act.limit is None else act.limit
        for name, v in (("alpha", act.alpha), ("beta", act.beta), ("limit", limit)):
            swiglu[f"swiglu_{name}"] = torch.full((e,), v, dtype=torch.float32, device=x.device)
    out = torch.empty(m, kp, dtype=torch.bfloat16, device=x.device)  # [M, Kp]
    cutlass_fused_moe(
        input=F.pad(x, (0, kp - fw.hidden)),
        token_selected_experts=ids,
        token_final_scales=scales,
        fc1_expert_weights=fw.w13,
        fc2_expert_weights=fw.w2,
        output_dtype=torch.bfloat16,
        quant_scales=[fw.s13.view(torch.int32), fw.s2.view(torch.int32)],
        fc1_expert_biases=fw.b13,
        fc2_expert_biases=fw.b2,
        tp_size=1,
        tp_rank=0,
        ep_size=1,
        ep_rank=0,
        use_w4_group_scaling=True,
        activation_type=ActivationType.Swiglu,
        tune_max_num_tokens=max(1, 1 << (m - 1).bit_length()),
        output=out,
        **swiglu,
    )
    return out[:, : fw.hidden].contiguous()
