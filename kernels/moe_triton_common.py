"""Pieces the two Triton MXFP4 MoE kernels share: the matrix-multiply helper, the gate/up GEMM
with its SwiGLU epilogue, the dequantization mode a launch takes, and the launchers' input
checks (the MXFP4 tiles themselves: ``mxfp4_tile``; the sums per slot after the GEMMs:
``moe_slot_sums``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pdserve.kernels.moe_reference import MoeWeights, SwiGLU
from pdserve.kernels.mxfp4_tile import ONE_MUL, code_ptrs, load_codes, rows_later

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


@triton.jit
def x_mask(rmask, k0, K, TAIL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Load mask of one [BM, BK] activation tile at k0; a TAIL tile is cut at K."""
    if TAIL:
        xm = rmask[:, None] & ((k0 + tl.arange(0, BLOCK_K)) < K)[None, :]
    else:
        xm = rmask[:, None]
    return xm


@triton.jit
def _gate_up_step(
    acc_g, acc_u, x_ptrs, wg_ptrs, sg_ptrs, wu_ptrs, su_ptrs, rmask, rows_ok, k0, K,
    DTYPE: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, INTERLEAVED: tl.constexpr,
    SWAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """The gate and up accumulators after the K tile at k0."""
    xt = tl.load(x_ptrs + k0, mask=x_mask(rmask, k0, K, TAIL, BLOCK_K), other=0.0)  # [BM, BK]
    wgt = load_codes(wg_ptrs, sg_ptrs, rows_ok, k0, K, DTYPE, FAST, INTERLEAVED, BLOCK_N,
                     BLOCK_K, TAIL)  # fmt: skip  # [BN, BK]
    acc_g = mma_xw(xt, wgt, acc_g, UPCAST, SWAP)
    wut = load_codes(wu_ptrs, su_ptrs, rows_ok, k0, K, DTYPE, FAST, INTERLEAVED, BLOCK_N,
                     BLOCK_K, TAIL)  # fmt: skip
    acc_u = mma_xw(xt, wut, acc_u, UPCAST, SWAP)
    return acc_g, acc_u


@triton.jit
def split_range(K, sk, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Split ``sk`` of SPLIT_K's share of a reduction over K: its whole K tiles k_lo .. k_hi and
    whether the partial tile at K - K % BLOCK_K (if any) is also its. The splits take
    cdiv(tiles, SPLIT_K) tiles each, the last ones fewer (or none: an empty split adds zeros)."""
    k_main = K - K % BLOCK_K
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = k_main
        tail = k_main < K
    else:
        per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = sk * per
        k_hi = tl.minimum(k_lo + per, k_main)
        tail = (k_main < K) & (k_lo <= k_main) & (k_main < k_lo + per)
    return k_lo, k_hi, tail


@triton.jit
def gate_up_accs(
    x_ptrs, rmask, w_ptr, s_ptr, n0, H, I, stride_wn, stride_sn, k_lo, k_hi, tail,
    DTYPE: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, INTERLEAVED: tl.constexpr,
    SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The float32 gate and up accumulators [BM, BN] of rows n0 .. n0 + BN over the whole K
    tiles k_lo .. k_hi and, when ``tail``, the partial tile at H - H % BLOCK_K.

    ``x_ptrs`` [BM, BK] point at the rows' first K tile; ``w_ptr``, ``s_ptr`` at the expert's
    codes and scales (``code_ptrs``), whose gate rows n0 .. n0 + BN this tile reads (the up
    rows follow I rows later). SWAP: see ``mma_xw``."""
    wg_ptrs, sg_ptrs, rows_ok = code_ptrs(w_ptr, s_ptr, n0, I, stride_wn, stride_sn,
                                          INTERLEAVED, BLOCK_N, BLOCK_K)  # fmt: skip
    wu_ptrs = wg_ptrs + rows_later(I, stride_wn, INTERLEAVED)
    su_ptrs = sg_ptrs + rows_later(I, stride_sn, INTERLEAVED)
    acc_g = acc_zeros(BLOCK_M, BLOCK_N, SWAP)
    acc_u = acc_zeros(BLOCK_M, BLOCK_N, SWAP)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # whole K tiles, unmasked (pipelined)
        acc_g, acc_u = _gate_up_step(
            acc_g, acc_u, x_ptrs, wg_ptrs, sg_ptrs, wu_ptrs, su_ptrs, rmask, rows_ok, k0, H,
            DTYPE, UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_N, BLOCK_K, False,
        )  # fmt: skip
    if tail:
        acc_g, acc_u = _gate_up_step(
            acc_g, acc_u, x_ptrs, wg_ptrs, sg_ptrs, wu_ptrs, su_ptrs, rmask, rows_ok,
            H - H % BLOCK_K, H, DTYPE, UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_N, BLOCK_K, True,
        )  # fmt: skip
    return acc_rows(acc_g, SWAP), acc_rows(acc_u, SWAP)


@triton.jit
def gate_up_swiglu(
    x_ptrs, rmask, w_ptr, s_ptr, n0, b_ptr, H, I, stride_wn, stride_sn, alpha, beta, limit,
    DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, UPCAST: tl.constexpr,
    FAST: tl.constexpr, INTERLEAVED: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One [BM, BN] tile of h = swiglu(x W_gate^T + b_gate, x W_up^T + b_up), float32, over the
    whole of H (``gate_up_accs``' pointers; ``b_ptr`` at the expert's biases). Gate and up are
    rounded to DTYPE first, as the reference's x @ W13^T in the model dtype is."""
    k_lo, k_hi, tail = split_range(H, 0, 1, BLOCK_K)
    acc_g, acc_u = gate_up_accs(
        x_ptrs, rmask, w_ptr, s_ptr, n0, H, I, stride_wn, stride_sn, k_lo, k_hi, tail, DTYPE,
        UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if HAS_BIAS:
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < I
        acc_g += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + I + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    gate = acc_g.to(DTYPE).to(tl.float32)
    up = acc_u.to(DTYPE).to(tl.float32)
    return swiglu(gate, up, alpha, beta, limit, HAS_LIMIT)


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
