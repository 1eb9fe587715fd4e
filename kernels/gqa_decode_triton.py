"""Triton paged GQA decode: op ``gqa_decode``, backend ``triton``. Contract: ``gqa_reference``.

A program takes one KV head of one sequence and the GROUP = H / KVH query heads that read it
(padded to BLOCK_G >= 16 rows for ``tl.dot``), so each [BLOCK_N, D] key and value tile is loaded
once for the whole group. A token's row is found through the block table (any page size); its
KV head's key and value are the D columns at ``2 * D * head`` and the D after them. The cache may
be a column range of a wider one (rows longer than their width), as one tensor-parallel rank
reads its own KV heads.

A sliding window (W > 0) starts the loop at the tile holding position seq_len - W: tiles before
it are never read. Online softmax in float32, base 2.

Split-KV: with few (sequence, KV head) programs the visible range is cut into NUM_SPLITS pieces
(grid axis 2) whose normalized partial outputs and log-sum-exps ``_combine_kernel`` merges. The
split count depends on shapes only (batch, KV heads, block-table width, window), never on the
lengths, so a launch can be captured in a CUDA graph. The sinks join the softmax once: in the
combine, or at the end of the single-split kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import triton_configs
from pdserve.kernels.device import sm_count
from pdserve.kernels.mla_decode_triton import combine_width, split_count
from pdserve.kernels.moe_triton_common import interpreting, mma, output_like, upcast_dots

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
DECODE_CONFIG = triton_configs.GQA_DECODE


# one compile for every split count and block-table width: neither, nor the strides that
# follow them, specialized (an eager step's table is as wide as its longest sequence)
@triton.jit(do_not_specialize=["NUM_SPLITS", "stride_btb", "stride_lb", "stride_lh"])
def _decode_kernel(
    q_ptr, kv_ptr, bt_ptr, lens_ptr, sink_ptr, o_ptr, part_ptr, lse_ptr, window, scale_log2,
    stride_qb, stride_qh, stride_kvn, stride_kvp, stride_btb, stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    NUM_SPLITS, D: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    gmask = g < GROUP
    heads = kvh * GROUP + g  # [BG] query heads of this KV head
    dd = tl.arange(0, D)
    seq_len = tl.load(lens_ptr + b)
    lo = 0  # the first visible position
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    first = (lo // BLOCK_N) * BLOCK_N  # the tile holding it: earlier tiles are skipped
    per_split = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    t_start = first + split * per_split
    t_end = tl.minimum(t_start + per_split, seq_len)
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_rows + dd[None, :], mask=gmask[:, None], other=0.0)  # [BG, D]
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    k_col = kvh * 2 * D + dd  # [D]; the value follows the key
    for t0 in range(t_start, t_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = (t < t_end) & (t >= lo)
        page = tl.load(bt_row + t // PAGE, mask=tmask, other=0).to(tl.int64)
        row = kv_ptr + page * stride_kvn + (t % PAGE).to(tl.int64) * stride_kvp  # [BN]
        k = tl.load(row[:, None] + k_col[None, :], mask=tmask[:, None], other=0.0)  # [BN, D]
        s = mma(q, tl.trans(k), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), UPCAST)
        s = tl.where(tmask[None, :], s * scale_log2, float("-inf"))  # [BG, BN], log2 domain
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a visible token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(row[:, None] + (k_col + D)[None, :], mask=tmask[:, None], other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)  # [BG, D]
        m_i = m_new
    if not SPLIT:
        if HAS_SINKS:  # one more logit in the denominator, with no value
            sink = tl.load(sink_ptr + heads, mask=gmask, other=0.0).to(tl.float32) * _LOG2E
            m_f = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_f)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha + tl.exp2(sink - m_f)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty sequence gives 0
        o_ptrs = o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dd[None, :]
        tl.store(o_ptrs, out, mask=gmask[:, None])
    else:
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        p_ptrs = part_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps
        tl.store(p_ptrs + dd[None, :], acc / safe_l[:, None], mask=gmask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=gmask)


@triton.jit(do_not_specialize=["NUM_SPLITS", "stride_lb", "stride_lh"])
def _combine_kernel(
    part_ptr, lse_ptr, sink_ptr, o_ptr,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    NUM_SPLITS, D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
    """Grid (B, H): out = sum_s w_s part_s / (sum_s w_s + e^sink), w_s = 2^(lse_s - max)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    smask = sp < NUM_SPLITS
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + sp, mask=smask, other=float("-inf"))
    mx = tl.max(lse, 0)
    if HAS_SINKS:
        sink = tl.load(sink_ptr + h).to(tl.float32) * _LOG2E
        mx = tl.maximum(mx, sink)
    mx = tl.where(mx > float("-inf"), mx, 0.0)  # every split empty (length 0): weights all 0
    w = tl.exp2(lse - mx)  # [BS]; empty splits (lse -inf) weigh 0
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp2(sink - mx)
    dd = tl.arange(0, D)
    part = tl.load(
        part_ptr + b * stride_pb + h * stride_ph + sp[:, None] * stride_ps + dd[None, :],
        mask=(smask & (w > 0))[:, None],
        other=0.0,
    )  # [BS, D]
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + dd, out)


def _check(q, kv_cache, block_table, seq_lens, sinks, window) -> None:
    """ValueError for what a caller can get wrong; shapes as in ``gqa_reference``."""
    if q.dim() != 3 or kv_cache.dim() != 3:
        raise ValueError(f"q {tuple(q.shape)}, kv_cache {tuple(kv_cache.shape)}: need 3 dims")
    b, h, d = q.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two >= 16 (tl.dot)")
    width = kv_cache.shape[2]
    kv_heads = width // (2 * d)
    if width % (2 * d) or kv_heads == 0 or h % kv_heads:
        raise ValueError(f"kv_cache rows of {width} do not hold KV heads of 2 * {d} for {h} heads")
    if q.dtype != kv_cache.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q {q.dtype} and kv_cache {kv_cache.dtype} must share a float dtype")
    if q.stride(2) != 1 or kv_cache.stride(2) != 1:
        raise ValueError("q and kv_cache need unit stride in their last dim")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.stride(1) != 1:
        raise ValueError(f"block_table {tuple(block_table.shape)} must be [B={b}, max_blocks]")
    if seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} {seq_lens.dtype} must be [B] int")
    check_sinks_window(q, sinks, window, "decode")


def check_sinks_window(q: torch.Tensor, sinks, window: int, what: str) -> None:
    """The checks both GQA kernels make of their sinks [H], window and device (``what``:
    "decode" or "prefill", for the message)."""
    h = q.shape[1]
    if sinks is not None and (sinks.shape != (h,) or not sinks.is_floating_point()):
        raise ValueError(f"sinks {tuple(sinks.shape)} {sinks.dtype} must be [H={h}] float")
    if window < 0:
        raise ValueError(f"window {window} is negative")
    if not interpreting() and not q.is_cuda:
        raise ValueError(f"the Triton GQA {what} runs on CUDA tensors, q is on {q.device}")


def gqa_decode_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor | None,
    scale: float,
    window: int,
    *,
    num_splits: int | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``gqa_decode_torch``; ``num_splits`` and ``config`` (BLOCK_N, num_warps,
    num_stages) override the tuning, ``out`` [B, H, D] receives the result."""
    _check(q, kv_cache, block_table, seq_lens, sinks, window)
    b, h, d = q.shape
    kv_heads = kv_cache.shape[2] // (2 * d)
    group = h // kv_heads
    out = output_like(q, (b, h, d), out)  # [B, H, D]
    if b == 0:
        return out
    cfg = config or DECODE_CONFIG
    page = kv_cache.shape[1]
    if num_splits is None:
        ctx = block_table.shape[1] * page  # the longest context the table can hold
        if window:
            ctx = min(ctx, window + cfg["BLOCK_N"])  # the window plus its first tile's lead
        num_splits = split_count(b, kv_heads, ctx, cfg["BLOCK_N"], sm_count(q.device))
    seq_lens = seq_lens.contiguous()
    sinks = sinks.contiguous() if sinks is not None else None
    if num_splits > 1:
        part = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
    else:
        part, lse = out, out  # unused
    sink_arg = sinks if sinks is not None else out  # unused without sinks
    _decode_kernel[(b, kv_heads, num_splits)](
        q, kv_cache, block_table, seq_lens, sink_arg, out, part, lse, window, scale * LOG2E,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        NUM_SPLITS=num_splits, D=d, GROUP=group, PAGE=page, SPLIT=num_splits > 1,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=cfg["BLOCK_N"],
        HAS_SINKS=sinks is not None, HAS_WINDOW=window > 0, UPCAST=upcast_dots(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if num_splits > 1:
        _combine_kernel[(b, h)](
            part, lse, sink_arg, out,
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, D=d, BLOCK_S=combine_width(num_splits),
            HAS_SINKS=sinks is not None,
        )  # fmt: skip
    return out
