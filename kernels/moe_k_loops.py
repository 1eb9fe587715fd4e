"""The MoE GEMMs' K loops over one expert's MXFP4 weight tiles: gate/up (with its SwiGLU
epilogue) and down, each over a split's whole K tiles and then the partial last one.

Two ways to overlap a tile's loads with the tiles before it, picked by a tile config's
``AHEAD``:

- 0: Triton's pipeliner (the launch's ``num_stages``) stages every tile through shared memory:
  cp.async into a ring of buffers, a wait, then a load from shared memory into registers.
- 1 or 2: the loop itself issues tile k + AHEAD's loads into registers before it dequantizes
  and multiplies tile k, and carries the AHEAD tiles in flight as loaded (a thread's share of a
  64 x 64 weight tile at 4 warps: 4 code words and 1 scale word; of the activations: 4
  registers). In the
  fragment layout the codes load straight into the thread's share of the MMA's left operand
  (``mxfp4_tile.code_ptrs``), so the weights never touch shared memory; only the few activation
  rows do, as the MMA's right operand. Loads past the loop's end are masked off.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pdserve.kernels.moe_triton_common import acc_rows, acc_zeros, mma_xw, swiglu
from pdserve.kernels.mxfp4_tile import code_ptrs, dequant_tile, raw_codes, rows_later


@triton.jit
def x_mask(rmask, k0, K, TAIL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Load mask of one [BM, BK] activation tile at k0; a TAIL tile is cut at K."""
    if TAIL:
        xm = rmask[:, None] & ((k0 + tl.arange(0, BLOCK_K)) < K)[None, :]
    else:
        xm = rmask[:, None]
    return xm


@triton.jit
def _mma_tile(
    acc, x, w, sc, DTYPE: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
    INTERLEAVED: tl.constexpr, SWAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The accumulator (``mma_xw``'s) after the activations x [BM, BK] times one weight tile
    as loaded (``raw_codes``' codes and scales, dequantized here)."""
    wt = dequant_tile(w, sc, BLOCK_N, BLOCK_K, DTYPE, FAST, INTERLEAVED)  # [BN, BK]
    return mma_xw(x, wt, acc, UPCAST, SWAP)


@triton.jit
def _gate_up_step(
    acc_g, acc_u, x_ptrs, wg_ptrs, sg_ptrs, wu_ptrs, su_ptrs, rmask, rows_ok, k0, K,
    DTYPE: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, INTERLEAVED: tl.constexpr,
    SWAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """The gate and up accumulators after the K tile at k0 (up's codes loaded after gate's
    product: at 128 rows and more, loading both first takes 10% more registers, sm_90)."""
    x = tl.load(x_ptrs + k0, mask=x_mask(rmask, k0, K, TAIL, BLOCK_K), other=0.0)  # [BM, BK]
    wg, sg = raw_codes(wg_ptrs, sg_ptrs, rows_ok, k0, K, INTERLEAVED, BLOCK_N, BLOCK_K, TAIL)
    acc_g = _mma_tile(acc_g, x, wg, sg, DTYPE, UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_N, BLOCK_K)
    wu, su = raw_codes(wu_ptrs, su_ptrs, rows_ok, k0, K, INTERLEAVED, BLOCK_N, BLOCK_K, TAIL)
    acc_u = _mma_tile(acc_u, x, wu, su, DTYPE, UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_N, BLOCK_K)
    return acc_g, acc_u


@triton.jit
def _before(k0, k_hi):
    """k0 < k_hi as a mask of shape [1], to AND into a tile's masks (the interpreter turns a
    scalar condition ANDed with a tensor into an int32 mask, which its loads reject)."""
    return (tl.zeros([1], tl.int32) + k0) < k_hi


@triton.jit
def _gate_up_tiles(
    x_ptrs, wg_ptrs, sg_ptrs, wu_ptrs, su_ptrs, rmask, rows_ok, k0, k_hi,
    INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The whole K tile at k0 as loaded (nothing where k0 is past k_hi): activations [BM, BK],
    gate and up codes and scales (``raw_codes``)."""
    ok = _before(k0, k_hi)  # [1]
    x = tl.load(x_ptrs + k0, mask=rmask[:, None] & ok, other=0.0)  # [BM, BK]
    wg, sg = raw_codes(wg_ptrs, sg_ptrs, rows_ok & ok, k0, k_hi, INTERLEAVED, BLOCK_N, BLOCK_K,
                       False)  # fmt: skip
    wu, su = raw_codes(wu_ptrs, su_ptrs, rows_ok & ok, k0, k_hi, INTERLEAVED, BLOCK_N, BLOCK_K,
                       False)  # fmt: skip
    return x, wg, sg, wu, su


@triton.jit
def _gate_up_ahead(
    acc_g, acc_u, x_ptrs, wg_ptrs, sg_ptrs, wu_ptrs, su_ptrs, rmask, rows_ok, k_lo, k_hi,
    DTYPE: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, INTERLEAVED: tl.constexpr,
    SWAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AHEAD: tl.constexpr,
):  # fmt: skip
    """``_gate_up_step`` over the whole K tiles k_lo .. k_hi, each loaded AHEAD (1 or 2) tiles
    early into registers."""
    tl.static_assert(AHEAD == 1 or AHEAD == 2, "AHEAD is 0, 1 or 2")
    x0, wg0, sg0, wu0, su0 = _gate_up_tiles(
        x_ptrs, wg_ptrs, sg_ptrs, wu_ptrs, su_ptrs, rmask, rows_ok, k_lo, k_hi, INTERLEAVED,
        BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if AHEAD == 2:
        x1, wg1, sg1, wu1, su1 = _gate_up_tiles(
            x_ptrs, wg_ptrs, sg_ptrs, wu_ptrs, su_ptrs, rmask, rows_ok, k_lo + BLOCK_K, k_hi,
            INTERLEAVED, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=1):  # pipelined by hand
        xn, wgn, sgn, wun, sun = _gate_up_tiles(
            x_ptrs, wg_ptrs, sg_ptrs, wu_ptrs, su_ptrs, rmask, rows_ok, k0 + AHEAD * BLOCK_K,
            k_hi, INTERLEAVED, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        acc_g = _mma_tile(acc_g, x0, wg0, sg0, DTYPE, UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_N,
                          BLOCK_K)  # fmt: skip
        acc_u = _mma_tile(acc_u, x0, wu0, su0, DTYPE, UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_N,
                          BLOCK_K)  # fmt: skip
        if AHEAD == 2:
            x0, wg0, sg0, wu0, su0 = x1, wg1, sg1, wu1, su1
            x1, wg1, sg1, wu1, su1 = xn, wgn, sgn, wun, sun
        else:
            x0, wg0, sg0, wu0, su0 = xn, wgn, sgn, wun, sun
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
    AHEAD: tl.constexpr,
):  # fmt: skip
    """The float32 gate and up accumulators [BM, BN] of rows n0 .. n0 + BN over the whole K
    tiles k_lo .. k_hi (loaded AHEAD tiles early, or pipelined by Triton when AHEAD is 0) and,
    when ``tail``, the partial tile at H - H % BLOCK_K.

    ``x_ptrs`` [BM, BK] point at the rows' first K tile; ``w_ptr``, ``s_ptr`` at the expert's
    codes and scales (``code_ptrs``), whose gate rows n0 .. n0 + BN this tile reads (the up
    rows follow I rows later). SWAP: see ``mma_xw``."""
    wg_ptrs, sg_ptrs, rows_ok = code_ptrs(w_ptr, s_ptr, n0, I, stride_wn, stride_sn,
                                          INTERLEAVED, BLOCK_N, BLOCK_K)  # fmt: skip
    wu_ptrs = wg_ptrs + rows_later(I, stride_wn, INTERLEAVED)
    su_ptrs = sg_ptrs + rows_later(I, stride_sn, INTERLEAVED)
    acc_g = acc_zeros(BLOCK_M, BLOCK_N, SWAP)
    acc_u = acc_zeros(BLOCK_M, BLOCK_N, SWAP)
    if AHEAD:
        acc_g, acc_u = _gate_up_ahead(
            acc_g, acc_u, x_ptrs, wg_ptrs, sg_ptrs, wu_ptrs, su_ptrs, rmask, rows_ok, k_lo, k_hi,
            DTYPE, UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_N, BLOCK_K, AHEAD,
        )  # fmt: skip
    else:
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
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AHEAD: tl.constexpr,
):  # fmt: skip
    """One [BM, BN] tile of h = swiglu(x W_gate^T + b_gate, x W_up^T + b_up), float32, over the
    whole of H (``gate_up_accs``' pointers; ``b_ptr`` at the expert's biases). Gate and up are
    rounded to DTYPE first, as the reference's x @ W13^T in the model dtype is."""
    k_lo, k_hi, tail = split_range(H, 0, 1, BLOCK_K)
    acc_g, acc_u = gate_up_accs(
        x_ptrs, rmask, w_ptr, s_ptr, n0, H, I, stride_wn, stride_sn, k_lo, k_hi, tail, DTYPE,
        UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_M, BLOCK_N, BLOCK_K, AHEAD,
    )  # fmt: skip
    if HAS_BIAS:
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < I
        acc_g += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + I + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    gate = acc_g.to(DTYPE).to(tl.float32)
    up = acc_u.to(DTYPE).to(tl.float32)
    return swiglu(gate, up, alpha, beta, limit, HAS_LIMIT)


@triton.jit
def _down_load(
    h_ptrs, w_ptrs, sc_ptrs, rmask, rows_ok, k0, K, INTERLEAVED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """The K tile at k0 as loaded: activations [BM, BK], codes and scales (``raw_codes``). A
    TAIL tile is cut at K."""
    h = tl.load(h_ptrs + k0, mask=x_mask(rmask, k0, K, TAIL, BLOCK_K), other=0.0)  # [BM, BK]
    w, sc = raw_codes(w_ptrs, sc_ptrs, rows_ok, k0, K, INTERLEAVED, BLOCK_N, BLOCK_K, TAIL)
    return h, w, sc


@triton.jit
def _down_step(
    acc, h_ptrs, w_ptrs, sc_ptrs, rmask, rows_ok, k0, K,
    DTYPE: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, INTERLEAVED: tl.constexpr,
    SWAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """The down projection's accumulator after the K tile at k0."""
    h, w, sc = _down_load(h_ptrs, w_ptrs, sc_ptrs, rmask, rows_ok, k0, K, INTERLEAVED, BLOCK_N,
                          BLOCK_K, TAIL)  # fmt: skip
    return _mma_tile(acc, h, w, sc, DTYPE, UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_N, BLOCK_K)


@triton.jit
def _down_tiles(
    h_ptrs, w_ptrs, sc_ptrs, rmask, rows_ok, k0, k_hi, INTERLEAVED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``_down_load``'s whole K tile at k0, nothing where k0 is past k_hi."""
    ok = _before(k0, k_hi)  # [1]
    return _down_load(h_ptrs, w_ptrs, sc_ptrs, rmask & ok, rows_ok & ok, k0, k_hi, INTERLEAVED,
                      BLOCK_N, BLOCK_K, False)  # fmt: skip


@triton.jit
def down_acc(
    h_ptrs, w_ptrs, sc_ptrs, rmask, rows_ok, k_lo, k_hi, tail, K,
    DTYPE: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, INTERLEAVED: tl.constexpr,
    SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    AHEAD: tl.constexpr,
):  # fmt: skip
    """The down projection's float32 accumulator [BM, BN] over the whole K tiles k_lo .. k_hi
    (loaded AHEAD tiles early, or pipelined by Triton when AHEAD is 0) and, when ``tail``, the
    partial tile at K - K % BLOCK_K. ``h_ptrs`` [BM, BK] point at the rows' first K tile;
    ``w_ptrs``, ``sc_ptrs``, ``rows_ok`` are ``code_ptrs``'."""
    acc = acc_zeros(BLOCK_M, BLOCK_N, SWAP)
    if AHEAD:
        tl.static_assert(AHEAD == 1 or AHEAD == 2, "AHEAD is 0, 1 or 2")
        h0, w0, s0 = _down_tiles(h_ptrs, w_ptrs, sc_ptrs, rmask, rows_ok, k_lo, k_hi,
                                 INTERLEAVED, BLOCK_N, BLOCK_K)  # fmt: skip
        if AHEAD == 2:
            h1, w1, s1 = _down_tiles(h_ptrs, w_ptrs, sc_ptrs, rmask, rows_ok, k_lo + BLOCK_K,
                                     k_hi, INTERLEAVED, BLOCK_N, BLOCK_K)  # fmt: skip
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=1):  # pipelined by hand
            hn, wn, sn = _down_tiles(
                h_ptrs, w_ptrs, sc_ptrs, rmask, rows_ok, k0 + AHEAD * BLOCK_K, k_hi, INTERLEAVED,
                BLOCK_N, BLOCK_K,
            )  # fmt: skip
            acc = _mma_tile(acc, h0, w0, s0, DTYPE, UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_N,
                            BLOCK_K)  # fmt: skip
            if AHEAD == 2:
                h0, w0, s0 = h1, w1, s1
                h1, w1, s1 = hn, wn, sn
            else:
                h0, w0, s0 = hn, wn, sn
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):  # whole K tiles, unmasked (pipelined)
            acc = _down_step(acc, h_ptrs, w_ptrs, sc_ptrs, rmask, rows_ok, k0, K, DTYPE, UPCAST,
                             FAST, INTERLEAVED, SWAP, BLOCK_N, BLOCK_K, False)  # fmt: skip
    if tail:  # at most one partial tile
        acc = _down_step(acc, h_ptrs, w_ptrs, sc_ptrs, rmask, rows_ok, K - K % BLOCK_K, K, DTYPE,
                         UPCAST, FAST, INTERLEAVED, SWAP, BLOCK_N, BLOCK_K, True)  # fmt: skip
    return acc_rows(acc, SWAP)
