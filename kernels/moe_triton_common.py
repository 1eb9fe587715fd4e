"""Pieces the two Triton MXFP4 MoE kernels share: the matrix-multiply helpers, SwiGLU, the
dequantization mode a launch takes, and the launchers' input checks (the MXFP4 tiles
themselves: ``mxfp4_tile``; the GEMMs' K loops: ``moe_k_loops``; the sums per slot after the
GEMMs: ``moe_slot_sums``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pdserve.kernels.moe_reference import MoeWeights, SwiGLU
from pdserve.kernels.mxfp4_tile import ONE_MUL

MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, numpy semantics)."""
    return bool(triton.knobs.runtime.interpret)


def fast_dequant(x: torch.Tensor, weights: MoeWeights) -> int:
    """How ``mxfp4_tile.dequant_tile`` decodes (its FAST): 0, its exact float16 path; 1, inline
    PTX, for bf16 activations on a GPU whose PTX has ``mul.rn.bf16x2`` (sm_90 and later);
    ONE_MUL, that PTX with one multiply per pair of values, for experts in the fragment layout
    whose scales all fit it (``MoeWeights.small_scales``)."""
    if not (x.dtype == torch.bfloat16 and x.is_cuda and not interpreting() and _sm90(x.device)):
        return 0
    return ONE_MUL if weights.interleaved and weights.small_scales else 1


@functools.cache
def _sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether tl.dot gets float32 operands: always for float32 models (no tf32), and under the
    interpreter, whose tl.dot multiplies bfloat16 bit patterns (triton-lang/triton#11584)."""
    return dtype == torch.float32 or interpreting()


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def mma_xw(x, w, acc, UPCAST: tl.constexpr, SWAP: tl.constexpr):
    """acc + x @ w^T for activations x [BM, BK] and dequantized weights w [BN, BK]; acc is
    [BM, BN], or [BN, BM] when SWAP: then the weights are the MMA's left operand, which Hopper's
    wgmma takes from registers (no shared-memory hop after the dequantization), and the few
    activation rows its right one."""
    if SWAP:  # a static if with an else: Triton generates only the branch taken
        acc = mma(w, tl.trans(x), acc, UPCAST)
    else:
        acc = mma(x, tl.trans(w), acc, UPCAST)
    return acc


@triton.jit
def acc_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """A float32 accumulator for ``mma_xw``: [BM, BN], or [BN, BM] when SWAP."""
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    return acc


@triton.jit
def acc_rows(acc, SWAP: tl.constexpr):
    """An ``mma_xw`` accumulator as [BM, BN]."""
    if SWAP:
        rows = tl.trans(acc)
    else:
        rows = acc
    return rows


@triton.jit
def swiglu(gate, up, alpha, beta, limit, HAS_LIMIT: tl.constexpr):
    """h = g * sigmoid(alpha * g) * (u + beta) with g = min(gate, limit), u = clamp(up, +-limit)."""
    if HAS_LIMIT:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    return gate * tl.sigmoid(alpha * gate) * (up + beta)


def layout_args(cfg: dict, interleaved: bool) -> dict[str, bool]:
    """The kernels' INTERLEAVED and SWAP for a tile config: fragment-layout tiles are the MMA's
    left operand (SWAP) and span whole 64-column stripes."""
    assert not interleaved or cfg["BLOCK_K"] % 64 == 0, cfg
    return {"INTERLEAVED": interleaved, "SWAP": bool(cfg.get("SWAP", 0)) or interleaved}


def fit_block_k(cfg: dict, k: int) -> dict:
    """cfg with BLOCK_K halved until it divides the reduction dim k (a multiple of 32), so that
    the K loop needs no masks (masked loads would not be pipelined)."""
    bk = cfg["BLOCK_K"]
    while k % bk:
        bk //= 2
    assert bk >= 32, (cfg, k)
    return cfg if bk == cfg["BLOCK_K"] else dict(cfg, BLOCK_K=bk)


def output_like(x: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor | None) -> torch.Tensor:
    """A fresh output, or the caller's (checked) one."""
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, expected {shape} {x.dtype}")
    if out.stride(-1) != 1:
        raise ValueError("out needs unit stride in its last dim")
    return out


def check_moe_inputs(
    x: torch.Tensor,
    weights: MoeWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    act: SwiGLU,
) -> None:
    """ValueError for what a caller can get wrong; shapes as in ``moe_reference``."""
    if x.dtype not in MODEL_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {MODEL_DTYPES}")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [M, H] with unit stride in H, got {tuple(x.shape)}")
    e, two_i, h_half = weights.w13.shape
    inter, hidden = two_i // 2, weights.hidden
    if x.shape[1] != hidden or h_half * 2 != hidden or hidden % 32 or inter % 32:
        raise ValueError(f"x hidden {x.shape[1]} does not fit w13 {tuple(weights.w13.shape)}")
    expect = {
        "s13": (e, two_i, hidden // 32),
        "w2": (e, hidden, inter // 2),
        "s2": (e, hidden, inter // 32),
    }
    for name, shape in expect.items():
        t = getattr(weights, name)
        if tuple(t.shape) != shape or t.dtype != torch.uint8:
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype}, expected {shape} uint8")
    for name in ("w13", "s13", "w2", "s2"):
        t = getattr(weights, name)
        if not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"{name} must be contiguous and on {x.device}")
    for name, shape in (("b13", (e, two_i)), ("b2", (e, hidden))):
        b = getattr(weights, name)
        if b is not None and (tuple(b.shape) != shape or b.stride(-1) != 1):
            raise ValueError(f"{name} must be {shape} with unit last stride, got {tuple(b.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} does not match x {tuple(x.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids dtype {topk_ids.dtype} is not int32 or int64")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} != topk_ids {tuple(topk_ids.shape)}"
        )
    if act.limit is not None and act.limit < 0:
        raise ValueError(f"SwiGLU limit {act.limit} is negative")
    if not interpreting() and not x.is_cuda:
        raise ValueError(f"the Triton MoE runs on CUDA tensors, x is on {x.device}")
