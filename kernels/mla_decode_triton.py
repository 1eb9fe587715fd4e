"""Triton paged MLA decode: op ``mla_decode``, backend ``triton``. Contract: ``mla_reference``.

Absorbed MLA is MQA over the D-wide latent rows of the cache: every head reads the same rows,
so a program takes BLOCK_H heads of one sequence and loads each [BLOCK_N, D] KV tile once for
all of them. Scores use all D columns; V is the first v_dim columns of the same tile, so the
tile is read once for both products. D splits into [0, v_dim) and [v_dim, D), each padded to a
power of two and masked (DeepSeek 512 + 64; the tiny model 64 + 16). Any page size: each token's
row is found through the block table.

Split-KV: with few sequences and heads, the context is cut into NUM_SPLITS ranges (grid axis 2)
whose partial outputs and log-sum-exps ``_combine_kernel`` merges. The split count depends on
shapes only (batch, heads, block-table width), never on the lengths, so it is graph-safe. It is a
runtime argument, not a compile-time one: an eager step's block table is as wide as its longest
sequence, so its split count changes from step to step, and each value would otherwise compile
the kernels again while serving.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import triton_configs
from pdserve.kernels.dependent_launch import launch_args, pdl_start
from pdserve.kernels.device import sm_count, smem_per_sm
from pdserve.kernels.moe_triton_common import interpreting, mma, output_like

LOG2E = 1.4426950408889634


# one compile for every split count and block-table width: neither, nor the strides that
# follow them, specialized (an eager step's table is as wide as its longest sequence)
@triton.jit(do_not_specialize=["NUM_SPLITS", "stride_btb", "stride_lb", "stride_lh"])
def _decode_kernel(
    q_ptr, kv_ptr, bt_ptr, lens_ptr, o_ptr, part_ptr, lse_ptr, H, scale_log2,
    stride_qb, stride_qh, stride_kvn, stride_kvp, stride_btb, stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    V_DIM: tl.constexpr, R_DIM: tl.constexpr, PAGE: tl.constexpr,
    NUM_SPLITS, SPLIT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, HAS_R: tl.constexpr, UPCAST: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_start(PDL)  # see kernels.dependent_launch
    # head blocks vary fastest: the programs of one sequence and split run side by side, so
    # the KV tiles one of them loads are in L2 for the others (128 heads: 2-4 head blocks)
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    b = tl.program_id(1)
    split = tl.program_id(2)
    hmask = heads < H
    seq_len = tl.load(lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    t_start = split * per_split
    t_end = tl.minimum(t_start + per_split, seq_len)
    dv = tl.arange(0, BLOCK_V)
    dr = tl.arange(0, BLOCK_R)
    vmask = dv < V_DIM
    rmask = dr < R_DIM
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_v = tl.load(q_rows + dv[None, :], mask=hmask[:, None] & vmask[None, :], other=0.0)  # [BH, BV]
    if HAS_R:
        q_r = tl.load(q_rows + V_DIM + dr[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    # each tile's pages are read one tile ahead, so that its KV loads depend on no load of their
    # own iteration: Triton's pipeliner then keeps num_stages - 1 KV tiles in flight while the
    # tile before computes (read in the iteration, the pages took the stages and the loop held
    # one KV buffer, its loads never overlapping its products: BENCHMARKS.md)
    t = t_start + tl.arange(0, BLOCK_N)
    page = tl.load(bt_row + t // PAGE, mask=t < t_end, other=0)  # [BN], the first tile's
    for t0 in range(t_start, t_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < t_end
        row = kv_ptr + page.to(tl.int64) * stride_kvn + (t % PAGE).to(tl.int64) * stride_kvp
        t_next = t + BLOCK_N
        page = tl.load(bt_row + t_next // PAGE, mask=t_next < t_end, other=0)  # the next tile's
        kv_v = tl.load(row[:, None] + dv[None, :], mask=tmask[:, None] & vmask[None, :], other=0.0)
        s = mma(q_v, tl.trans(kv_v), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), UPCAST)
        if HAS_R:
            kv_r = tl.load(
                row[:, None] + V_DIM + dr[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0
            )  # [BN, BR]
            s = mma(q_r, tl.trans(kv_r), s, UPCAST)
        s = s * scale_log2  # [BH, BN], log2 domain
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(kv_v.dtype), kv_v, acc * alpha[:, None], UPCAST)  # [BH, BV]
        m_i = m_new
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    if not SPLIT:
        o_ptrs = o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptrs, out, mask=hmask[:, None] & vmask[None, :])
    else:
        p_ptrs = part_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps
        tl.store(p_ptrs + dv[None, :], out, mask=hmask[:, None] & vmask[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=hmask)


@triton.jit(do_not_specialize=["H", "HEADS", "NUM_SPLITS", "stride_lb", "stride_lh"])
def _combine_kernel(
    part_ptr, lse_ptr, o_ptr, H, HEADS,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    NUM_SPLITS, V_DIM: tl.constexpr, V_SPAN: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_V: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (B, cdiv(H, HEADS), cdiv(V_DIM, V_SPAN)): for each of the program's HEADS heads and
    its V_SPAN columns, out = sum_s exp2(lse_s - max) * part_s / sum_s exp2(lse_s - max), in
    BLOCK_V column steps."""
    pdl_start(PDL)  # see kernels.dependent_launch
    b = tl.program_id(0)
    sp = tl.arange(0, BLOCK_S)
    smask = sp < NUM_SPLITS
    h0 = tl.program_id(1) * HEADS
    for h in range(h0, tl.minimum(h0 + HEADS, H)):
        lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + sp, mask=smask, other=float("-inf"))
        mx = tl.max(lse, 0)
        mx = tl.where(mx > float("-inf"), mx, 0.0)  # all splits empty (length 0): weights all 0
        w = tl.exp2(lse - mx)  # [BS]; empty splits (lse -inf) weigh 0
        total = tl.sum(w, 0)
        inv = 1.0 / tl.where(total > 0, total, 1.0)
        rows = part_ptr + b * stride_pb + h * stride_ph + sp[:, None] * stride_ps
        rmask = (smask & (w > 0))[:, None]
        for v0 in tl.static_range(0, V_SPAN, BLOCK_V):
            dv = tl.program_id(2) * V_SPAN + v0 + tl.arange(0, BLOCK_V)
            vmask = dv < V_DIM
            part = tl.load(rows + dv[None, :], mask=rmask & vmask[None, :], other=0.0)  # [BS, BV]
            out = tl.sum(part * w[:, None], 0) * inv
            tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + dv, out, mask=vmask)


def combine_width(num_splits: int) -> int:
    """The combine's tile of partial rows: 16, or 128 past 16 splits (``split_count``'s most),
    so that eager steps, whose block tables' width and so split counts vary step to step,
    compile the combine twice at most."""
    return 16 if num_splits <= 16 else max(128, triton.next_power_of_2(num_splits))


COMBINE_TILE = 4096  # partial values one combine step holds: 32 float32 registers a thread


def combine_grid(batch: int, heads: int, block_v: int, num_sms: int) -> tuple[int, int]:
    """(heads, columns) per combine program. Few (sequence, head) pairs (under two per SM):
    one head and 64 columns each, for enough programs; more: every column, and as many heads
    as leave about four programs per SM (at most 16), so that large batches run a few thousand
    programs of several KB each rather than one per head and 64-column chunk (measured on an
    H100: at 64 sequences x 128 heads the decode and combine took 0.168 ms against 0.226)."""
    if batch * heads < 2 * num_sms:
        return 1, min(block_v, 64)
    return max(1, min(16, batch * heads // (4 * num_sms))), block_v


def split_count(
    batch: int,
    head_blocks: int,
    max_ctx: int,
    block_n: int,
    num_sms: int,
    per_sm: int = 2,
    one_wave: bool = False,
) -> int:
    """Splits for about ``per_sm`` (sequence, head block, split) programs per SM, each split >=
    2 KV tiles, at most 128 splits (the combine then reads 128 partial rows per head).
    ``one_wave``: at most one wave of them, ``per_sm`` being the programs an SM holds at once
    (``programs_per_sm``), as the MLA decode counts: a second wave would pay each program's
    fixed work (its query tile, its partial output) again for the same KV. Without it (the GQA
    decode's count, timed so), the count rounds up."""
    slots, pairs = per_sm * num_sms, batch * head_blocks
    want = slots // pairs if one_wave else triton.cdiv(slots, pairs)
    return max(1, min(want, triton.cdiv(max_ctx, 2 * block_n), 128))


def programs_per_sm(cfg: dict, head_dim: int, elem_bytes: int, device: torch.device) -> int:
    """Decode programs of tiles ``cfg`` an SM holds at once by shared memory, 1 or 2 (2 where
    the device does not say): 128-token tiles at 16 heads (164 KiB at D = 576) and 64-head
    tiles of 64 tokens (218 KiB) fit once in an H100's or H200's 228 KiB."""
    per_sm = smem_per_sm(device)
    if not per_sm:
        return 2
    need = triton_configs.mla_decode_smem(cfg, head_dim, elem_bytes)
    return max(1, min(2, per_sm // need))


def mla_decode_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    v_dim: int,
    *,
    num_splits: int | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``mla_decode_torch``; ``num_splits`` and ``config`` override the tuning,
    ``out`` [B, H, v_dim] receives the result."""
    if q.dim() != 3 or kv_cache.dim() != 3 or q.shape[2] != kv_cache.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)}, kv_cache {tuple(kv_cache.shape)} must be [B, H, D], [N, bs, D]"
        )
    b, h, d = q.shape
    if not 0 < v_dim <= d:
        raise ValueError(f"v_dim {v_dim} must be in (0, D={d}]")
    if q.dtype != kv_cache.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q {q.dtype} and kv_cache {kv_cache.dtype} must share a float dtype")
    if q.stride(2) != 1 or kv_cache.stride(2) != 1:
        raise ValueError("q and kv_cache need unit stride in D")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.stride(1) != 1:
        raise ValueError(f"block_table {tuple(block_table.shape)} must be [B={b}, max_blocks]")
    if seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} {seq_lens.dtype} must be [B] int")
    if not interpreting() and not q.is_cuda:
        raise ValueError(f"the Triton MLA decode runs on CUDA tensors, q is on {q.device}")
    out = output_like(q, (b, h, v_dim), out)  # [B, H, v_dim]
    if b == 0:
        return out
    cfg = config or triton_configs.mla_decode_config(triton_configs.device_keys(q.device), h)
    page = kv_cache.shape[1]
    head_blocks = triton.cdiv(h, cfg["BLOCK_H"])
    if num_splits is None:
        sms = sm_count(q.device)
        per_sm = programs_per_sm(cfg, d, q.element_size(), q.device)
        num_splits = split_count(
            b, head_blocks, block_table.shape[1] * page, cfg["BLOCK_N"], sms, per_sm, True
        )
    block_v = max(16, triton.next_power_of_2(v_dim))
    block_r = max(16, triton.next_power_of_2(d - v_dim)) if d > v_dim else 16
    seq_lens = seq_lens.contiguous()
    if num_splits > 1:
        part = torch.empty(b, h, num_splits, v_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
    else:
        part, lse = out, out  # unused
    p = launch_args(q.device)
    _decode_kernel[(head_blocks, b, num_splits)](
        q, kv_cache, block_table, seq_lens, out, part, lse,
        h, scale * LOG2E,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        V_DIM=v_dim, R_DIM=d - v_dim, PAGE=page,
        NUM_SPLITS=num_splits, SPLIT=num_splits > 1, BLOCK_H=cfg["BLOCK_H"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_V=block_v, BLOCK_R=block_r, HAS_R=d > v_dim,
        UPCAST=interpreting() or q.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **p,
    )  # fmt: skip
    if num_splits > 1:
        width = combine_width(num_splits)
        heads, span = combine_grid(b, h, block_v, sm_count(q.device))
        _combine_kernel[(b, triton.cdiv(h, heads), triton.cdiv(v_dim, span))](
            part, lse, out, h, heads,
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, V_DIM=v_dim, V_SPAN=span, BLOCK_S=width,
            BLOCK_V=min(span, max(16, COMBINE_TILE // width)), **p,
        )  # fmt: skip
    return out
