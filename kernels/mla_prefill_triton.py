"""Triton MLA prefill: op ``mla_prefill``, backend ``triton``. Contract: ``mla_reference``.

Causal variable-length flash attention (online softmax, one program per BLOCK_M queries of one
head of one sequence). A sequence's queries are the last q_len of its k_len keys (a chunk after
a cached prefix), so query i sees keys 0 .. k_len - q_len + i and a query block stops at the
last key any of its queries sees. Dqk may differ from Dv (DeepSeek 192 vs 128): Dqk splits into
a power of two plus a masked power-of-two remainder (128 + 64; the tiny model 32 + 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import triton_configs
from pdserve.kernels.moe_triton_common import interpreting, mma, output_like

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, cu_k_ptr, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    D2: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_D2: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q0 = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q0
    k0 = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k0
    shift = k_len - q_len  # cached prefix before the chunk
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < q_len
    d1 = tl.arange(0, BLOCK_D1)
    d2 = tl.arange(0, BLOCK_D2)
    dv = tl.arange(0, BLOCK_DV)
    d2mask = d2 < D2
    dvmask = dv < DV
    q_rows = q_ptr + (q0 + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh
    q_1 = tl.load(q_rows + d1[None, :], mask=mmask[:, None], other=0.0)  # [BM, D1]
    if HAS_D2:
        q_2 = tl.load(
            q_rows + BLOCK_D1 + d2[None, :], mask=mmask[:, None] & d2mask[None, :], other=0.0
        )  # [BM, D2]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # keys past the block's last query are masked for all of it; a block past q_len does nothing
    k_end = tl.where(pid_m * BLOCK_M < q_len, tl.minimum(k_len, shift + (pid_m + 1) * BLOCK_M), 0)
    for n0 in range(0, k_end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        kmask = kpos < k_len
        k_rows = k_ptr + (k0 + kpos).to(tl.int64)[:, None] * stride_kt + head * stride_kh
        k_1 = tl.load(k_rows + d1[None, :], mask=kmask[:, None], other=0.0)  # [BN, D1]
        s = mma(q_1, tl.trans(k_1), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST)
        if HAS_D2:
            k_2 = tl.load(
                k_rows + BLOCK_D1 + d2[None, :], mask=kmask[:, None] & d2mask[None, :], other=0.0
            )  # [BN, D2]
            s = mma(q_2, tl.trans(k_2), s, UPCAST)
        s = s * scale_log2  # [BM, BN], log2 domain
        causal = (kpos[None, :] <= shift + offs_m[:, None]) & kmask[None, :]
        s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with no key yet stay empty
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = v_ptr + (k0 + kpos).to(tl.int64)[:, None] * stride_vt + head * stride_vh
        v = tl.load(v_rows + dv[None, :], mask=kmask[:, None] & dvmask[None, :], other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)  # [BM, DV]
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = o_ptr + (q0 + offs_m).to(tl.int64)[:, None] * stride_ot + head * stride_oh
    tl.store(o_rows + dv[None, :], out, mask=mmask[:, None] & dvmask[None, :])


def mla_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    *,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``mla_prefill_torch``; ``config`` overrides the tuned tiles, ``out``
    [Tq, H, Dv] receives the result."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, H, D], got {q.dim()}, {k.dim()}, {v.dim()} dims")
    tq, h, dqk = q.shape
    if k.shape[1:] != (h, dqk) or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    floats = (torch.bfloat16, torch.float16, torch.float32)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in floats:
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must be one float dtype")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("q, k and v need unit stride in the head dim")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError(f"cu_seqlens {tuple(cu_seqlens_q.shape)} vs {tuple(cu_seqlens_k.shape)}")
    if not interpreting() and not q.is_cuda:
        raise ValueError(f"the Triton MLA prefill runs on CUDA tensors, q is on {q.device}")
    dv = v.shape[2]
    if dqk < 16:
        raise ValueError(f"head dim {dqk} is below the 16 that tl.dot needs")
    out = output_like(q, (tq, h, dv), out)  # [Tq, H, Dv]
    num_seqs = cu_seqlens_q.shape[0] - 1
    if tq == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    cfg = config or triton_configs.pick(triton_configs.MLA_PREFILL, q.device, max_seqlen_q)
    block_d1 = 1 << (dqk.bit_length() - 1)  # largest power of two <= Dqk
    d2 = dqk - block_d1
    block_d2 = max(16, triton.next_power_of_2(d2)) if d2 else 16
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), h, num_seqs)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        D2=d2, DV=dv, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D1=block_d1,
        BLOCK_D2=block_d2,
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), HAS_D2=d2 > 0,
        UPCAST=interpreting() or q.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out
