"""Triton GQA prefill: op ``gqa_prefill``, backend ``triton``. Contract: ``gqa_reference``.

Causal variable-length flash attention with attention sinks and an optional sliding window
(GPT-OSS): one program per BLOCK_M queries of one query head of one sequence, reading the KV
head h // (H / KVH). A sequence's queries are the last q_len of its k_len keys (a chunk after a
cached prefix), so query i sits at position p = k_len - q_len + i and sees keys j <= p, and with
a window W > 0 only those with p - j < W. The key loop runs from the tile holding the block's
first query's first visible key to its last query's position: tiles wholly before the window or
after the causal edge are never read, the rest are masked per element. Online softmax in float32,
base 2; the sink logit joins only the final normalization. K and V may be strided views (a
column range of the cache's rows, gathered).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import triton_configs
from pdserve.kernels.gqa_decode_triton import check_sinks_window
from pdserve.kernels.moe_triton_common import mma, output_like, upcast_dots

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
PREFILL_CONFIG = triton_configs.GQA_PREFILL


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, cu_k_ptr, sink_ptr, window, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    D: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    kvh = head // GROUP
    q0 = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q0
    k0 = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k0
    shift = k_len - q_len  # cached prefix before the chunk
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < q_len
    qpos = shift + offs_m  # [BM] positions among the keys
    dd = tl.arange(0, D)
    q_rows = q_ptr + (q0 + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh
    q = tl.load(q_rows + dd[None, :], mask=mmask[:, None], other=0.0)  # [BM, D]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    # keys past the block's last query are hidden from all of it; a block past q_len does nothing
    hi = tl.where(pid_m * BLOCK_M < q_len, shift + tl.minimum((pid_m + 1) * BLOCK_M, q_len), 0)
    lo = 0
    if HAS_WINDOW:  # the first key the block's first query sees
        lo = tl.maximum(shift + pid_m * BLOCK_M - window + 1, 0)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        kmask = kpos < hi
        k_rows = k_ptr + (k0 + kpos).to(tl.int64)[:, None] * stride_kt + kvh * stride_kh
        k = tl.load(k_rows + dd[None, :], mask=kmask[:, None], other=0.0)  # [BN, D]
        s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST)
        seen = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]  # [BM, BN]
        if HAS_WINDOW:
            seen &= qpos[:, None] - kpos[None, :] < window
        s = tl.where(seen, s * scale_log2, float("-inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, 1))  # -inf in rows that have seen no key yet
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # ... which then stay empty
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = v_ptr + (k0 + kpos).to(tl.int64)[:, None] * stride_vt + kvh * stride_vh
        v = tl.load(v_rows + dd[None, :], mask=kmask[:, None], other=0.0)  # [BN, D]
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)  # [BM, D]
        m_i = m_new
    if HAS_SINKS:  # one more logit in the denominator, with no value
        sink = tl.load(sink_ptr + head).to(tl.float32) * _LOG2E
        m_f = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_f)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.exp2(sink - m_f)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = o_ptr + (q0 + offs_m).to(tl.int64)[:, None] * stride_ot + head * stride_oh
    tl.store(o_rows + dd[None, :], out, mask=mmask[:, None])


def _check(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, window) -> None:
    """ValueError for what a caller can get wrong; shapes as in ``gqa_reference``."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, heads, D], got {q.dim()}, {k.dim()}, {v.dim()} dims")
    h, d = q.shape[1:]
    kv_heads = k.shape[1]
    if k.shape[2] != d or v.shape != k.shape or kv_heads == 0 or h % kv_heads:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two >= 16 (tl.dot)")
    floats = (torch.bfloat16, torch.float16, torch.float32)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in floats:
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must be one float dtype")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("q, k and v need unit stride in the head dim")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError(f"cu_seqlens {tuple(cu_seqlens_q.shape)} vs {tuple(cu_seqlens_k.shape)}")
    check_sinks_window(q, sinks, window, "prefill")


def gqa_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    sinks: torch.Tensor | None,
    window: int,
    *,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``gqa_prefill_torch``; ``config`` (BLOCK_M, BLOCK_N, num_warps,
    num_stages) overrides the tiles, ``out`` [Tq, H, D] receives the result."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, window)
    tq, h, d = q.shape
    out = output_like(q, (tq, h, d), out)  # [Tq, H, D]
    num_seqs = cu_seqlens_q.shape[0] - 1
    if tq == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    cfg = config or PREFILL_CONFIG
    sinks = sinks.contiguous() if sinks is not None else None
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), h, num_seqs)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, sinks if sinks is not None else out,
        window, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        D=d, GROUP=h // k.shape[1], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_SINKS=sinks is not None, HAS_WINDOW=window > 0, UPCAST=upcast_dots(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out
