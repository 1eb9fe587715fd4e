"""Pieces the two Triton MXFP4 MoE kernels share: on-chip tile dequantization, the matrix-multiply
helper, the gate/up GEMM with its SwiGLU epilogue, and the launchers' input checks (the sums per
slot after the GEMMs: ``moe_slot_sums``).

Dequantization never leaves the chip: a packed tile [BN, BK/2] of bytes and its E8M0 scales
[BN, BK/32] become a [BN, BK] tile of the activation dtype in registers, right before ``tl.dot``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pdserve.kernels.moe_reference import MoeWeights, SwiGLU

MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, numpy semantics)."""
    return bool(triton.knobs.runtime.interpret)


ONE_MUL = 2  # fast_dequant's mode for fragment-layout experts whose scales fit one multiply


def fast_dequant(x: torch.Tensor, weights: MoeWeights) -> int:
    """How ``dequant_tile`` decodes (its FAST): 0, its exact float16 path; 1, inline PTX, for
    bf16 activations on a GPU whose PTX has ``mul.rn.bf16x2`` (sm_90 and later); ONE_MUL, that
    PTX with one multiply per pair of values, for experts in the fragment layout whose scales
    all fit it (``MoeWeights.small_scales``)."""
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


# Four packed bytes ($4) -> eight bf16: two bf16x2 registers of low nibbles ($0: bytes 0, 1;
# $1: bytes 2, 3) and two of high nibbles ($2, $3), two elements per instruction. The four bytes
# are four elements of the packed tile, in whatever order Triton's layout gives them, so each
# carries its own scale word ($5..$8: bf16 bits of 2**(s - 64)). PRMT spreads bytes into 16-bit
# lanes; a nibble's sign goes to bit 15 and its exponent and mantissa bits to bits 8..6, which
# makes the bf16 E2M1 * 2**-126 exactly (code 1 a subnormal, which bf16 arithmetic keeps);
# times 2**63, then times 2**(s - 64), gives E2M1 * 2**(s - 127).
_E2M1X8_TO_BF16 = tl.constexpr(
    """
{
.reg .b32 t0, t1, a, b, c63, s01, s23;
mov.b32 c63, 0x5F005F00;
prmt.b32 s01, $5, $6, 0x5410;
prmt.b32 s23, $7, $8, 0x5410;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
shl.b32 a, t0, 6; shl.b32 b, t0, 12; and.b32 a, a, 0x01C001C0; and.b32 b, b, 0x80008000;
or.b32 a, a, b; mul.rn.bf16x2 a, a, c63; mul.rn.bf16x2 $0, a, s01;
shl.b32 a, t1, 6; shl.b32 b, t1, 12; and.b32 a, a, 0x01C001C0; and.b32 b, b, 0x80008000;
or.b32 a, a, b; mul.rn.bf16x2 a, a, c63; mul.rn.bf16x2 $1, a, s23;
shl.b32 a, t0, 2; shl.b32 b, t0, 8; and.b32 a, a, 0x01C001C0; and.b32 b, b, 0x80008000;
or.b32 a, a, b; mul.rn.bf16x2 a, a, c63; mul.rn.bf16x2 $2, a, s01;
shl.b32 a, t1, 2; shl.b32 b, t1, 8; and.b32 a, a, 0x01C001C0; and.b32 b, b, 0x80008000;
or.b32 a, a, b; mul.rn.bf16x2 a, a, c63; mul.rn.bf16x2 $3, a, s23;
}
"""
)


# One fragment-layout word ($4, ``mxfp4.interleave_mxfp4``) -> four bf16x2 registers of the
# MMA A operand: $0 = A (row g, columns +0), $1 = B (row g, +8), $2 = C (row g + 8, +0),
# $3 = D (row g + 8, +8), each pair (column c = 0 low, 1 high). Masking the word and its shifts
# by 3 and 6 gives A, B, C as E2M1 * 2**-126; the spare bits give D. Then times the scale words
# $5 (row g) and $6 (row g + 8), the same bf16 in both lanes: 2**(s - 1) where every scale byte
# s is at most 128 (``_FRAGMENT_ONE_MUL``); else times 2**63 first and 2**(s - 64) after (s up
# to 191). Either way E2M1 * 2**(s - 127), exactly.
_FRAGMENT_BITS = """
{
.reg .b32 a, b, c, d, t, c63;
and.b32 a, $4, 0x81C081C0;
shl.b32 b, $4, 3; and.b32 b, b, 0x81C081C0;
shl.b32 c, $4, 6; and.b32 c, c, 0x81C081C0;
shl.b32 d, $4, 1; and.b32 d, d, 0x80008000;
shr.b32 t, $4, 3; and.b32 t, t, 0x01800180; or.b32 d, d, t;
shr.b32 t, $4, 7; and.b32 t, t, 0x00400040; or.b32 d, d, t;
"""
_FRAGMENT_TO_BF16 = tl.constexpr(
    _FRAGMENT_BITS
    + """mov.b32 c63, 0x5F005F00;
mul.rn.bf16x2 a, a, c63; mul.rn.bf16x2 $0, a, $5;
mul.rn.bf16x2 b, b, c63; mul.rn.bf16x2 $1, b, $5;
mul.rn.bf16x2 c, c, c63; mul.rn.bf16x2 $2, c, $6;
mul.rn.bf16x2 d, d, c63; mul.rn.bf16x2 $3, d, $6;
}
"""
)
_FRAGMENT_ONE_MUL = tl.constexpr(
    _FRAGMENT_BITS
    + """mul.rn.bf16x2 $0, a, $5;
mul.rn.bf16x2 $1, b, $5;
mul.rn.bf16x2 $2, c, $6;
mul.rn.bf16x2 $3, d, $6;
}
"""
)


@triton.jit
def _lane_codes(x):
    """A 16-bit lane of a fragment-layout word -> its codes (A, B, C, D): at shifts 0, 3, 6 and
    in the spare bits (``mxfp4._lanes``)."""
    a = ((x >> 15) & 1) << 3 | ((x >> 6) & 7)
    b = ((x >> 12) & 1) << 3 | ((x >> 3) & 7)
    c = ((x >> 9) & 1) << 3 | (x & 7)
    d = ((x >> 14) & 1) << 3 | ((x >> 11) & 1) << 2 | ((x >> 10) & 1) << 1 | ((x >> 13) & 1)
    return a, b, c, d


@triton.jit
def _per_word(x, KB: tl.constexpr, NB: tl.constexpr):
    """[KB, NB, 32, 1, 2] per scale group (j // 2) -> [KB, NB, 32, 4] per word j."""
    x = tl.broadcast_to(x.reshape(KB, NB, 32, 2, 1), (KB, NB, 32, 2, 2))
    return x.reshape(KB, NB, 32, 4)


@triton.jit
def _fragment_tile(words, scales, BN: tl.constexpr, BK: tl.constexpr, DTYPE: tl.constexpr,
                   FAST: tl.constexpr):  # fmt: skip
    """words [BK/64, BN/16, 32, 4] int32 and scale words [BK/64, BN/16, 32, 1] int32 of the
    fragment layout -> values [BN, BK] in DTYPE, each thread holding its MMA A-operand share
    (the reshapes below move no data on Hopper: the layouts agree)."""
    KB: tl.constexpr = BK // 64
    NB: tl.constexpr = BN // 16
    s_g = tl.join(scales & 0xFF, (scales >> 16) & 0xFF)  # [KB, NB, 32, 1, 2] row g, groups
    s_g8 = tl.join((scales >> 8) & 0xFF, (scales >> 24) & 0xFF)  # row g + 8
    if FAST:
        if FAST == 2:  # ONE_MUL: scale words of 2**(s - 1)
            ptx: tl.constexpr = _FRAGMENT_ONE_MUL
            bias: tl.constexpr = 126
        else:  # 2**(s - 64)
            ptx: tl.constexpr = _FRAGMENT_TO_BF16
            bias: tl.constexpr = 63
        wg = ((s_g + bias) << 7) * 0x10001  # the bf16 in both lanes
        wg8 = ((s_g8 + bias) << 7) * 0x10001
        a, b, c, d = tl.inline_asm_elementwise(
            ptx,
            "=r,=r,=r,=r,r,r,r",
            [words, _per_word(wg, KB, NB), _per_word(wg8, KB, NB)],
            dtype=(tl.int32,) * 4,
            is_pure=True,
            pack=1,
        )
        pairs = tl.join(tl.join(a, b), tl.join(c, d))  # [KB, NB, 32, 4, h, r] bf16x2
        lo = (pairs & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        hi = ((pairs >> 16) & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        vals = tl.join(lo, hi)  # [KB, NB, 32, 4, h, r, c]
    else:
        a0, b0, c0, d0 = _lane_codes(words & 0xFFFF)  # column c = 0
        a1, b1, c1, d1 = _lane_codes((words >> 16) & 0xFFFF)
        codes = tl.join(
            tl.join(tl.join(a0, b0), tl.join(c0, d0)), tl.join(tl.join(a1, b1), tl.join(c1, d1))
        )  # [KB, NB, 32, 4, h, r, c]
        bits = ((codes & 0x7) << 9) | ((codes & 0x8) << 12)
        vals = bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)  # E2M1 * 2**-14
        sc = tl.join(_per_word(s_g, KB, NB), _per_word(s_g8, KB, NB))  # [KB, NB, 32, 4, r]
        sc = ((sc + 14) << 23).to(tl.float32, bitcast=True)  # 2**(s - 127 + 14)
        vals = (vals * sc.reshape(KB, NB, 32, 4, 1, 2, 1)).to(DTYPE)
    # [kb, nb, g, t, j, h, r, c] -> rows nb*16 + r*8 + g, columns kb*64 + j*16 + h*8 + t*2 + c
    vals = vals.reshape(KB, NB, 8, 4, 4, 2, 2, 2).permute(1, 6, 2, 0, 4, 5, 3, 7)
    return vals.reshape(BN, BK)


@triton.jit
def _decode_codes(codes, scales, BN: tl.constexpr, BK: tl.constexpr, DTYPE: tl.constexpr):
    """codes [BN, BK] int32 (0..15), scales [BN, BK/32] -> values [BN, BK] in DTYPE, without
    inline PTX (see ``dequant_tile``)."""
    bits = ((codes & 0x7) << 9) | ((codes & 0x8) << 12)
    vals = bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)  # E2M1 * 2**-14
    scale = ((scales.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)  # [BN, BK/32]
    vals = vals.reshape(BN, BK // 32, 32) * scale[:, :, None]
    return vals.reshape(BN, BK).to(DTYPE)


@triton.jit
def dequant_tile(
    packed, scales, BN: tl.constexpr, BK: tl.constexpr, DTYPE: tl.constexpr, FAST: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """packed [BN, BK/2] uint8, scales [BN, BK/32] uint8 -> values [BN, BK] in DTYPE.

    Element 2j sits in the low nibble of byte j. INTERLEAVED: the fragment layout's words and
    scale words instead (``code_ptrs``, ``_fragment_tile``). FAST (``fast_dequant``; CUDA, bf16):
    inline PTX converts two elements per instruction; scales up to 191 (2**64) are exact; 2 (the
    fragment layout, scales up to 128): one multiply per pair instead of two. Otherwise (the
    interpreter, other dtypes): the code's sign goes to bit 15 and its exponent and mantissa bits
    to bits 11..9 of a float16, which then holds exactly E2M1 * 2**-14 (code 1 a float16
    subnormal, exact too); the float32 scale 2**(s - 127 + 14) is built from its bits (exact to
    s = 240).
    """
    if INTERLEAVED:
        vals = _fragment_tile(packed, scales, BN, BK, DTYPE, FAST)
    elif FAST:
        p3 = packed.reshape(BN, BK // 32, 16)  # [BN, groups, 16 bytes]
        word = ((scales.to(tl.int32) + 63) << 7).reshape(BN, BK // 32, 1)  # bf16 of 2**(s-64)
        lo, hi = tl.inline_asm_elementwise(
            _E2M1X8_TO_BF16,
            "=r,=r,=r,=r,r,r,r,r,r",
            [p3, word],
            dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True,
            pack=4,
        )
        vals = tl.join(lo, hi).reshape(BN, BK)
    else:
        b = packed.to(tl.int32)
        codes = tl.join(b & 0xF, b >> 4).reshape(BN, BK)  # [BN, BK]
        vals = _decode_codes(codes, scales, BN, BK, DTYPE)
    return vals


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
def code_ptrs(
    w_ptr, s_ptr, n0, N, stride_wn, stride_sn, INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Pointers to one expert's codes and scales (``w_ptr``, ``s_ptr`` at the expert) for rows
    n0 .. n0 + BN and the first K tile, and the rows' mask (N rows in all). Plain: bytes
    [BN, BK/2] and [BN, BK/32], strides per row. INTERLEAVED (the fragment layout; int32
    pointers, strides per 16-row stripe, ``code_views``): words [BK/64, BN/16, 32, 4], a warp's
    lane L reading the four of its MMA share with one 16-byte load, and scale words
    [BK/64, BN/16, 32, 1] (lanes 4g .. 4g + 3 read the same)."""
    if INTERLEAVED:
        kb = tl.arange(0, BLOCK_K // 64)[:, None, None, None]
        nb = tl.arange(0, BLOCK_N // 16)[None, :, None, None]
        lane = tl.arange(0, 32)[None, None, :, None]
        stripe = n0 // 16 + nb  # [1, NB, 1, 1]
        j = tl.arange(0, 4)[None, None, None, :]
        w_ptrs = w_ptr + stripe * stride_wn + kb * 128 + lane * 4 + j  # [KB, NB, 32, 4]
        s_ptrs = s_ptr + stripe * stride_sn + kb * 8 + lane // 4  # [KB, NB, 32, 1]
        rows_ok = n0 + nb * 16 < N
    else:
        n = n0 + tl.arange(0, BLOCK_N)
        w_ptrs = w_ptr + n[:, None] * stride_wn + tl.arange(0, BLOCK_K // 2)[None, :]
        s_ptrs = s_ptr + n[:, None] * stride_sn + tl.arange(0, BLOCK_K // 32)[None, :]
        rows_ok = (n < N)[:, None]
    return w_ptrs, s_ptrs, rows_ok


@triton.jit
def rows_later(rows, stride, INTERLEAVED: tl.constexpr):
    """The pointer offset of ``rows`` (a multiple of 16) rows further down."""
    if INTERLEAVED:
        off = (rows // 16) * stride
    else:
        off = rows * stride
    return off


@triton.jit
def load_codes(
    w_ptrs, s_ptrs, rows_ok, k0, K, DTYPE: tl.constexpr, FAST: tl.constexpr,
    INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """The dequantized [BN, BK] weight tile at k0 (``code_ptrs``' pointers). A TAIL tile is cut
    at K (a multiple of 32, of 64 when INTERLEAVED): masked codes read as 0 and masked scales
    as 127 (2 ** 0), so the tile past K adds exact zeros."""
    if INTERLEAVED:
        if TAIL:
            m = rows_ok & ((k0 + 64 * tl.arange(0, BLOCK_K // 64)) < K)[:, None, None, None]
        else:
            m = rows_ok
        w = tl.load(w_ptrs + k0 * 2, mask=m, other=0)  # 128 words per 64 columns
        sc = tl.load(s_ptrs + k0 // 8, mask=m, other=0x7F7F7F7F)  # 8 scale words per 64
    else:
        if TAIL:
            wm = rows_ok & ((k0 + 2 * tl.arange(0, BLOCK_K // 2)) < K)[None, :]
            sm = rows_ok & ((k0 + 32 * tl.arange(0, BLOCK_K // 32)) < K)[None, :]
        else:
            wm = rows_ok
            sm = rows_ok
        w = tl.load(w_ptrs + k0 // 2, mask=wm, other=0)
        sc = tl.load(s_ptrs + k0 // 32, mask=sm, other=127)
    return dequant_tile(w, sc, BLOCK_N, BLOCK_K, DTYPE, FAST, INTERLEAVED)


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


def code_views(
    codes: torch.Tensor, scales: torch.Tensor, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor, int, int, int, int]:
    """(codes, scales, their expert and row strides) as ``code_ptrs`` takes them: plain bytes
    with per-row strides, or (fragment layout) int32 words with per-stripe strides."""
    if interleaved:
        e, n, _ = codes.shape
        codes = codes.view(e, n // 16, -1).view(torch.int32)  # [E, N/16, 2K] words
        scales = scales.view(e, n // 16, -1).view(torch.int32)  # [E, N/16, K/8]
    return codes, scales, codes.stride(0), codes.stride(1), scales.stride(0), scales.stride(1)


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
