"""MXFP4 weight tiles on chip, as the Triton MoE kernels read them: pointers to one expert's codes
and scales per tile (plain bytes, or the fragment layout's words), their loads, and their
dequantization into the activation dtype.

Dequantization never leaves the chip: a packed tile [BN, BK/2] of bytes and its E8M0 scales
[BN, BK/32] become a [BN, BK] tile of the activation dtype in registers, right before ``tl.dot``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ONE_MUL = 2  # dequant_tile's FAST for fragment-layout experts whose scales fit one multiply


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
    scale words instead (``code_ptrs``, ``_fragment_tile``). FAST (CUDA, bf16; the launch's
    ``moe_triton_common.fast_dequant``): inline PTX converts two elements per instruction; scales
    up to 191 (2**64) are exact; ONE_MUL (the fragment layout, scales up to 128): one multiply
    per pair instead of two. Otherwise (the
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
def code_ptrs(
    w_ptr, s_ptr, n0, N, stride_wn, stride_sn, INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Pointers to one expert's codes and scales (``w_ptr``, ``s_ptr`` at the expert) for rows
    n0 .. n0 + BN and the first K tile, and the rows' mask (N rows in all). Plain: bytes
    [BN, BK/2] and [BN, BK/32], strides per row. INTERLEAVED (the fragment layout; int32
    pointers, strides per 16-row stripe, ``code_views``): per (64-column block kb, stripe nb)
    a chunk c = kb * BN/16 + nb of 32 lanes, words [chunks * 32, 4] (lane L reading words
    4L .. 4L + 3, its MMA share, with one 16-byte load) and scale words [chunks * 32] (lanes
    4g .. 4g + 3 reading word g), the mask [chunks * 32]. In the layouts Triton gives loads of
    these shapes (a thread per row of 4 words, or per word; lanes, then warps, along the rows:
    warp w takes the stripes nb = w mod warps) a thread holds its share of the MMA's operand,
    whatever order Triton breaks ties in: a tile needs no trip through shared memory between
    its load and the MMA (``moe_k_loops``)."""
    if INTERLEAVED:
        NB: tl.constexpr = BLOCK_N // 16
        e = tl.arange(0, BLOCK_K // 64 * NB * 32)  # [C * 32]: chunk e // 32, lane e % 32
        nb = (e // 32) % NB
        kb = e // (32 * NB)
        w_row = (n0 // 16 + nb) * stride_wn + kb * 128 + (e % 32) * 4  # [C * 32]
        w_ptrs = w_ptr + w_row[:, None] + tl.arange(0, 4)[None, :]  # [C * 32, 4]
        s_ptrs = s_ptr + (n0 // 16 + nb) * stride_sn + kb * 8 + (e % 32) // 4  # [C * 32]
        rows_ok = n0 + 16 * nb < N  # [C * 32]
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
def raw_codes(
    w_ptrs, s_ptrs, rows_ok, k0, K, INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """The codes and scales of the tile at k0 as loaded (``code_ptrs``' pointers), for
    ``dequant_tile``: bytes [BN, BK/2] and [BN, BK/32], or the fragment layout's words
    [BK/64, BN/16, 32, 4] and scale words [BK/64, BN/16, 32, 1]. A TAIL tile is cut at K (a
    multiple of 32, of 64 when INTERLEAVED): masked codes read as 0 and masked scales as 127
    (2 ** 0), so the tile past K adds exact zeros. ``rows_ok`` may carry a condition of shape
    [1] (a tile past a loop's end loads nothing)."""
    if INTERLEAVED:
        KB: tl.constexpr = BLOCK_K // 64
        NB: tl.constexpr = BLOCK_N // 16
        if TAIL:  # the chunks' 64-column blocks kb = e // (32 * NB)
            kb = tl.arange(0, KB * NB * 32) // (32 * NB)
            m = rows_ok & (k0 + 64 * kb < K)  # [C * 32]
        else:
            m = rows_ok
        w = tl.load(w_ptrs + k0 * 2, mask=m[:, None], other=0)  # 128 words per 64 columns
        sc = tl.load(s_ptrs + k0 // 8, mask=m, other=0x7F7F7F7F)  # 8 scale words per 64
        w = w.reshape(KB, NB, 32, 4)
        sc = sc.reshape(KB, NB, 32, 1)
    else:
        if TAIL:
            wm = rows_ok & ((k0 + 2 * tl.arange(0, BLOCK_K // 2)) < K)[None, :]
            sm = rows_ok & ((k0 + 32 * tl.arange(0, BLOCK_K // 32)) < K)[None, :]
        else:
            wm = rows_ok
            sm = rows_ok
        w = tl.load(w_ptrs + k0 // 2, mask=wm, other=0)
        sc = tl.load(s_ptrs + k0 // 32, mask=sm, other=127)
    return w, sc


@triton.jit
def load_codes(
    w_ptrs, s_ptrs, rows_ok, k0, K, DTYPE: tl.constexpr, FAST: tl.constexpr,
    INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """The dequantized [BN, BK] weight tile at k0 (``raw_codes``, then ``dequant_tile``)."""
    w, sc = raw_codes(w_ptrs, s_ptrs, rows_ok, k0, K, INTERLEAVED, BLOCK_N, BLOCK_K, TAIL)
    return dequant_tile(w, sc, BLOCK_N, BLOCK_K, DTYPE, FAST, INTERLEAVED)


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
