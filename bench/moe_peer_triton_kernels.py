"""OpenAI's triton_kernels MXFP4 MoE (``matmul_ogs``, what vLLM runs on Hopper) on our MoE inputs.

Benchmark-only adapter: the peer is imported lazily, from ``PYTHONPATH`` (``../shared/peers/
triton_kernels-v3.6.0``); the product never imports it. ``prepare`` converts our weights once
(untimed); ``moe_triton_kernels`` computes what ``moe_mxfp4_torch`` does.

Timed, per call of ``moe_triton_kernels`` (all GPU work; this code adds no host sync, so it is
meant to capture in a CUDA graph as vLLM captures the peer; not yet checked on a GPU):

- routing metadata, in torch (where, scatter_add_ histogram, stable argsort, two index
  scatters/gathers: about the work our own ``align_by_expert`` does) plus the peer's
  ``make_ragged_tensor_metadata`` (two Triton kernels);
- GEMM1, the peer's ``matmul_ogs``: gathers token rows, x @ W13 + b13, with OUR SwiGLU fused
  into its epilogue (``_swiglu_epilogue`` below, passed as a ``FusedActivation``; it is the
  clamped GPT-OSS form when ``act.limit`` is set and silu(gate) * up when ``act`` is plain),
  writing h in expert-sorted order;
- GEMM2, ``matmul_ogs``: h @ W2 + b2, times the routing weight (its ``gammas``), scattered to
  (token, k) rows, then the peer's own ``reduce`` kernel sums the K rows of each token in fp32
  (for top-1 it scatters straight into the output instead).

Nothing of the MoE's arithmetic runs in torch. Not timed: ``prepare`` (gate/up rows interleaved,
as the peer's fused activation and GPT-OSS checkpoints have them; codes and scales transposed to
its [E, K, N] orientation, the reduction dim K contiguous, then swizzled to its MX layouts for
this GPU: ``HopperMXValueLayout`` / ``HopperMXScaleLayout`` (8 warps) on sm_90, as vLLM does;
biases cast to fp32, as vLLM does). The peer's tile choices are its defaults (``make_opt_flags``);
vLLM's one Hopper constraint, split_k 1, is what MX weights get anyway.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.kernels.moe_reference import MoeWeights, SwiGLU

NUM_WARPS = 8  # vLLM's Hopper choice; the scale swizzle and the kernel's warps must agree


def unavailable() -> str | None:
    """Why the peer cannot run in this process, or None."""
    if importlib.util.find_spec("triton_kernels") is None:
        return "triton_kernels is not importable (PYTHONPATH=../shared/peers/triton_kernels-v3.6.0)"
    try:
        import triton_kernels.matmul_ogs  # noqa: F401
    except Exception as e:  # a Triton it was not written for, say
        return f"triton_kernels does not import: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return (
            "needs a CUDA GPU: matmul_ogs queries torch.cuda (capability, SM count) and launches "
            "kernels it builds itself, outside Triton's interpreter, so it cannot take CPU tensors"
        )
    if torch.cuda.get_device_capability() != (9, 0):
        name = torch.cuda.get_device_name()
        return f"wired for Hopper (sm_90) only, as vLLM runs it; this is {name}"
    return None


@triton.jit
def _swiglu_epilogue(acc, alpha, beta, limit):
    """Our SwiGLU on a GEMM1 tile: acc [BM, BN] fp32, gate/up columns interleaved -> [BM, BN/2]."""
    gate, up = tl.split(tl.reshape(acc, (acc.shape[0], acc.shape[1] // 2, 2)))
    if limit is not None:
        gate = tl.minimum(gate, limit)
        up = tl.clamp(up, -limit, limit)
    return gate * tl.sigmoid(alpha * gate) * (up + beta)


@dataclass(frozen=True)
class Prepared:
    w13: object  # triton_kernels Tensor, logical [E, H, 2I] FP4, gate/up columns interleaved
    w2: object  # logical [E, I, H] FP4
    pc13: object  # PrecisionConfig holding the swizzled scales of w13 ([E, H/32, 2I] logical)
    pc2: object  # ... of w2 ([E, I/32, H] logical)
    b13: torch.Tensor | None  # [E, 2I] fp32, interleaved like w13
    b2: torch.Tensor | None  # [E, H] fp32
    num_experts: int


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] rows [gate; up] -> rows (gate 0, up 0, gate 1, up 1, ...)."""
    e, two_i, *rest = t.shape
    return t.reshape(e, 2, two_i // 2, *rest).transpose(1, 2).reshape(e, two_i, *rest).contiguous()


def _to_peer(codes: torch.Tensor, scales: torch.Tensor):
    """codes [E, N, K/2] u8, scales [E, N, K/32] u8 (ours: F.linear's [out, in]) -> the peer's
    weight Tensor (logical [E, K, N], K contiguous: the transposes are views) and its
    PrecisionConfig, both in this GPU's default MX layouts with the MX axis (K) at dim 1."""
    from triton_kernels.matmul_ogs import FlexCtx, PrecisionConfig
    from triton_kernels.numerics import InFlexData
    from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor
    from triton_kernels.tensor_details import layout

    v_layout, v_opts = layout.make_default_matmul_mxfp4_w_layout(mx_axis=1)
    s_layout, s_opts = layout.make_default_matmul_mxfp4_w_scale_layout(1, num_warps=NUM_WARPS)
    # wrap_torch_tensor doubles the contiguous dim for FP4: [E, K/2, N] bytes -> [E, K, N]
    w = convert_layout(wrap_torch_tensor(codes.transpose(-2, -1), dtype=FP4), v_layout, **v_opts)
    s = convert_layout(wrap_torch_tensor(scales.transpose(-2, -1)), s_layout, **s_opts)
    return w, PrecisionConfig(weight_scale=s, flex_ctx=FlexCtx(rhs_data=InFlexData()))


def prepare(w: MoeWeights) -> Prepared:
    """Our weights -> the peer's, once per set of weights (not timed)."""
    w13, pc13 = _to_peer(_interleave(w.w13), _interleave(w.s13))
    w2, pc2 = _to_peer(w.w2, w.s2)
    b13 = None if w.b13 is None else _interleave(w.b13).float()
    b2 = None if w.b2 is None else w.b2.float().contiguous()
    return Prepared(w13, w2, pc13, pc2, b13, b2, w.num_experts)


def _routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int):
    """Our routing -> the peer's RoutingData, GatherIndx, ScatterIndx, as its bitmatrix metadata
    makes them: slots (token * K + k) sorted stably by expert; ids outside [0, E) sort last and
    are left out of every expert's slice."""
    from triton_kernels.matmul_ogs import GatherIndx, RoutingData, ScatterIndx
    from triton_kernels.tensor import make_ragged_tensor_metadata

    m, k = topk_ids.shape
    s, dev = m * k, topk_ids.device
    ids = topk_ids.reshape(-1).long()  # [S]
    valid = (ids >= 0) & (ids < num_experts)  # [S]
    key = torch.where(valid, ids, num_experts)  # [S], invalid -> bucket E
    hist = torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)
    hist = hist.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))[:num_experts]  # [E]
    order = torch.argsort(key, stable=True)  # [S] sorted position -> slot
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(s, device=dev))  # slot -> pos
    combine = torch.where(valid[order], order, -1).int()  # [S] position -> slot, -1 past the valid
    dispatch = torch.where(valid, pos, -1).int()  # [S] slot -> position, -1 for invalid slots
    gate_scal = topk_weights.reshape(-1)[order].float()  # [S] routing weights, sorted order
    meta = make_ragged_tensor_metadata(hist, s)  # per-expert offsets and tile schedules
    routing = RoutingData(gate_scal, hist, num_experts, k, meta)
    return routing, GatherIndx(src_indx=combine, dst_indx=dispatch), ScatterIndx(dispatch, combine)


def moe_triton_kernels(
    x: torch.Tensor,
    prepared: Prepared,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    act: SwiGLU,
) -> torch.Tensor:
    """x [M, H] bf16 -> out [M, H] bf16, as ``moe_mxfp4_torch`` computes it."""
    from triton_kernels.matmul_ogs import FnSpecs, FusedActivation, matmul_ogs

    if x.dtype != torch.bfloat16:
        raise ValueError(f"the peer's Hopper MXFP4 path takes bf16 activations, not {x.dtype}")
    m, k = topk_ids.shape
    if m == 0:
        return torch.zeros_like(x)
    routing, gather, scatter = _routing(topk_ids, topk_weights, prepared.num_experts)
    swiglu = FusedActivation(
        FnSpecs("pdserve_swiglu", _swiglu_epilogue, ("alpha", "beta", "limit"), reduction_n=2),
        (float(act.alpha), float(act.beta), None if act.limit is None else float(act.limit)),
    )
    # GEMM1: rows gathered from x, [M*K, H] @ [E][H, 2I] + b13, SwiGLU fused -> h [M*K, I], sorted
    h = matmul_ogs(
        x, prepared.w13, prepared.b13, routing, gather_indx=gather,
        precision_config=prepared.pc13, fused_activation=swiglu,
    )  # fmt: skip
    # GEMM2: [M*K, I] @ [E][I, H] + b2, times the routing weight, scattered and summed -> [M, H]
    return matmul_ogs(
        h, prepared.w2, prepared.b2, routing, scatter_indx=scatter,
        precision_config=prepared.pc2, gammas=routing.gate_scal,
    )  # fmt: skip
