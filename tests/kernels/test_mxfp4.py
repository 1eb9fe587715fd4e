"""The MXFP4 format (OCP Microscaling v1.0): E2M1 codes, E8M0 scales, packing, quantization."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pdserve.kernels.moe_reference import SMALL_SCALE_MAX
from pdserve.kernels.mxfp4 import (
    dequantize_mxfp4,
    e2m1_decode,
    e2m1_encode,
    e8m0_decode,
    interleave_mxfp4,
    pack_fp4,
    quantize_mxfp4,
    unpack_fp4,
)
from tests.kernels.kernel_cases import random_moe

# OCP MX v1.0, table of FP4 E2M1 values: sign bit, 2 exponent bits (bias 1), 1 mantissa bit
OCP_E2M1 = {
    0b0000: 0.0, 0b0001: 0.5, 0b0010: 1.0, 0b0011: 1.5,
    0b0100: 2.0, 0b0101: 3.0, 0b0110: 4.0, 0b0111: 6.0,
    0b1000: -0.0, 0b1001: -0.5, 0b1010: -1.0, 0b1011: -1.5,
    0b1100: -2.0, 0b1101: -3.0, 0b1110: -4.0, 0b1111: -6.0,
}  # fmt: skip


def test_every_e2m1_code_decodes_to_the_ocp_value():
    got = e2m1_decode(torch.arange(16, dtype=torch.uint8))
    for code, value in OCP_E2M1.items():
        assert got[code].item() == value
        assert math.copysign(1.0, got[code].item()) == math.copysign(1.0, value), code
        # and by the bit layout: exponent 0 is subnormal m * 0.5, else (1 + m/2) * 2**(e - 1)
        e, m = (code >> 1) & 3, code & 1
        mag = m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
        assert abs(value) == mag


def test_e8m0_edges():
    s = e8m0_decode(torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8))
    assert s[0].item() == 2.0**-127  # smallest scale, a float32 subnormal, still exact
    assert s[1].item() == 2.0**-126
    assert s[2].item() == 0.5 and s[3].item() == 1.0 and s[4].item() == 2.0
    assert s[5].item() == 2.0**127  # largest scale
    assert math.isnan(s[6].item())  # 0xFF is NaN; E8M0 has no zero, no sign, no infinity


def test_nibble_order_low_nibble_is_the_even_element():
    codes = torch.tensor([[0x1, 0x7, 0xA, 0x3]], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.tolist() == [[0x71, 0x3A]]
    assert torch.equal(unpack_fp4(packed), codes)
    vals = dequantize_mxfp4(
        torch.tensor([[0x71] * 16], dtype=torch.uint8), torch.tensor([[127]], dtype=torch.uint8)
    )
    assert vals[0, 0].item() == 0.5 and vals[0, 1].item() == 6.0


def _blocks_with_scale_one(values: list[float]) -> torch.Tensor:
    """One 32-wide block holding ``values`` plus a 4.0 so that the shared exponent is 0."""
    row = torch.zeros(32)
    row[0] = 4.0
    row[1 : 1 + len(values)] = torch.tensor(values)
    return row


def test_round_half_to_even_ties():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -2.0, -4.0]  # to the even code
    packed, scales = quantize_mxfp4(_blocks_with_scale_one(ties))
    assert scales.tolist() == [127]
    got = dequantize_mxfp4(packed, scales)[1 : 1 + len(ties)]
    assert got.tolist() == want
    # even codes have mantissa bit 0
    assert all(c & 1 == 0 for c in unpack_fp4(packed)[1 : 1 + len(ties)].tolist())


def test_saturation_and_sign_of_zero():
    # amax 7.9: shared exponent floor(log2 7.9) - 2 = 0, so 7.9 saturates to 6 (not to 8)
    row = _blocks_with_scale_one([7.9, -7.9, -0.1, -0.0, 0.0, 0.1])
    packed, scales = quantize_mxfp4(row)
    got = dequantize_mxfp4(packed, scales)
    assert scales.tolist() == [127]
    assert got[1].item() == 6.0 and got[2].item() == -6.0
    codes = unpack_fp4(packed)
    assert codes[3].item() == 0x8 and codes[4].item() == 0x8 and codes[5].item() == 0x0
    assert torch.signbit(got[3]) and torch.signbit(got[4]) and not torch.signbit(got[5])
    assert e2m1_encode(torch.tensor([100.0, -100.0])).tolist() == [0x7, 0xF]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_bound(seed):
    """|x - q(x)| <= half the E2M1 grid step at |x| / 2**shared, times 2**shared, where
    shared = floor(log2(amax)) - 2; the grid steps are 0.5 below 2, 1 up to 4 and 2 up to 6.
    The block's amax scaled lies in [4, 8): values above 6 * 2**shared saturate to 6 * 2**shared
    and are off by exactly |x| - 6 * 2**shared. So the overall bound is 2**shared for unsaturated
    values (the largest half step, 1, on [4, 6]), not 2**(shared - 1)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=gen) * torch.logspace(-6, 3, 64)[:, None]
    w[0, :32] = 0.0  # an all-zero block
    packed, scales = quantize_mxfp4(w)
    q = dequantize_mxfp4(packed, scales)
    blocks, qb = w.reshape(64, 8, 32), q.reshape(64, 8, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    shared = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127))
    assert torch.equal(scales.reshape(64, 8, 1).float() - 127, shared)
    y = blocks.abs() / 2.0**shared  # magnitudes on the E2M1 grid, in [0, 8)
    assert (y < 8).all()
    half_step = torch.where(y <= 2, 0.25, torch.where(y <= 4, 0.5, 1.0))
    err = (blocks - qb).abs()
    inside = y <= 6
    assert (err[inside] <= (half_step * 2.0**shared)[inside]).all()
    sat = ~inside
    assert sat.any()
    assert torch.equal(err[sat], (blocks.abs() - 6 * 2.0**shared)[sat])
    assert (err <= torch.maximum(2.0**shared, blocks.abs() - 6 * 2.0**shared)).all()
    assert torch.equal(q[0, :32], torch.zeros(32)) and scales[0, 0].item() == 0


def test_idempotent_on_representable_inputs():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (16, 128), dtype=torch.uint8, generator=gen)
    codes[:, ::32] = 0x7  # each block reaches 6 * scale, so its scale is the one we chose
    scales = torch.randint(100, 150, (16, 4), dtype=torch.uint8, generator=gen)
    v = dequantize_mxfp4(pack_fp4(codes), scales)
    p2, s2 = quantize_mxfp4(v)
    assert torch.equal(dequantize_mxfp4(p2, s2), v)  # representable values come back unchanged
    assert torch.equal(s2, scales)
    # and quantizing a dequantized tensor gives the same bytes again, for any input
    w = torch.randn(8, 64, generator=gen)
    p, s = quantize_mxfp4(w)
    p3, s3 = quantize_mxfp4(dequantize_mxfp4(p, s))
    assert torch.equal(p3, p) and torch.equal(s3, s)
    # -0.0 codes requantize to the same bytes too (sign of zero survives the round trip)
    assert torch.equal(unpack_fp4(p3), unpack_fp4(p))


def _fragment_word(words: torch.Tensor, stripe: int, kb: int, lane: int, j: int) -> int:
    """Word j of warp lane ``lane`` for columns 64 kb.. of 16-row stripe ``stripe``."""
    return int(words[stripe, kb * 128 + lane * 4 + j])


def test_fragment_layout_inverts_and_puts_each_lanes_share_in_its_words():
    """``interleave_mxfp4`` and its inverse; every word against the layout's definition: lane
    4g + t, word j holds rows g and g + 8 at columns 16j + 2t + {0, 1} (+ 8), masking gives the
    bf16 bits of E2M1 * 2**-126 (sign of zero included); the scale words likewise."""
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (2, 32, 64), dtype=torch.uint8, generator=gen)  # K = 128
    scales = torch.randint(0, 255, (2, 32, 4), dtype=torch.uint8, generator=gen)
    w, s = interleave_mxfp4(codes.clone(), scales.clone())
    assert w.shape == codes.shape and not torch.equal(w, codes) and not torch.equal(s, scales)
    back = interleave_mxfp4(w.clone(), s.clone(), inverse=True)
    assert torch.equal(back[0], codes) and torch.equal(back[1], scales)
    with pytest.raises(ValueError, match="K % 64"):
        interleave_mxfp4(codes[..., :16].clone(), scales[..., :1].clone())
    plain = unpack_fp4(codes).long()  # [2, 32, 128]
    mask = 0x81C081C0
    for e in range(2):
        words = w[e].reshape(2, -1, 4).view(torch.int32)[..., 0].long() & 0xFFFFFFFF
        sw = s[e].reshape(2, -1)  # [stripes, K/2] scale bytes
        for stripe, kb, lane, j in [(0, 0, 0, 0), (1, 1, 13, 3), (0, 1, 31, 2), (1, 0, 6, 1)]:
            x = _fragment_word(words, stripe, kb, lane, j)
            g, t = lane // 4, lane % 4
            d = (x << 1) & 0x80008000 | (x >> 3) & 0x01800180 | (x >> 7) & 0x00400040
            parts = {(0, 0): x & mask, (0, 8): (x << 3) & mask, (8, 0): (x << 6) & mask, (8, 8): d}
            for (dr, dc), pair in parts.items():
                for c in (0, 1):
                    row, col = stripe * 16 + g + dr, kb * 64 + 16 * j + dc + 2 * t + c
                    bits = torch.tensor((pair >> (16 * c)) & 0xFFFF).to(torch.int16)
                    got = bits.view(torch.bfloat16).float() * 2.0**126
                    want = e2m1_decode(plain[e, row, col].to(torch.uint8))
                    assert torch.equal(got, want) and got.signbit() == want.signbit()
            quad = sw[stripe, kb * 32 + 4 * g : kb * 32 + 4 * g + 4].tolist()
            rows = (stripe * 16 + g, stripe * 16 + g + 8)
            assert quad == [scales[e, r, 2 * kb + grp].item() for grp in (0, 1) for r in rows]


def _run_ptx(text: str, regs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The few PTX instructions the interleaved decode uses, on int64 tensors of 32-bit words
    (16-bit halves for ``mov.b32 {lo, hi}``): and, or, shl, shr, mov, mul.rn.bf16x2."""

    def val(tok: str) -> torch.Tensor | int:
        return int(tok, 16) if tok.startswith("0x") else regs[tok] if tok in regs else int(tok)

    def bf16(x: torch.Tensor | int) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.int64) & 0xFFFF
        return x.to(torch.int32).to(torch.int16).view(torch.bfloat16).float()

    def mul2(a, b) -> torch.Tensor:  # exact products here: any rounding would do
        halves = []
        for shift in (0, 16):
            z = (bf16(a >> shift) * bf16(b >> shift)).to(torch.bfloat16)
            halves.append((z.view(torch.int16).to(torch.int64) & 0xFFFF) << shift)
        return halves[0] | halves[1]

    ops = {
        "and.b32": lambda a, b: a & b,
        "or.b32": lambda a, b: a | b,
        "shl.b32": lambda a, b: (a << b) & 0xFFFFFFFF,
        "shr.b32": lambda a, b: a >> b,
        "mul.rn.bf16x2": mul2,
    }
    for line in text.replace("{\n", "\n").replace("\n}", "\n").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        if op == "mov.b32" and args.startswith("{"):  # a word's halves into two registers
            halves, src = args.split("}")
            lo, hi = (t.strip(" {") for t in halves.split(","))
            src = src.strip(" ,")
            regs[lo], regs[hi] = val(src) & 0xFFFF, val(src) >> 16
            continue
        dst, *src = (t.strip() for t in args.split(","))
        regs[dst] = val(src[0]) if op == "mov.b32" else ops[op](*(val(t) for t in src))
    return regs


@pytest.mark.parametrize("one_mul", [False, True])
def test_the_kernels_ptx_decodes_fragment_words_exactly(one_mul):
    """``_FRAGMENT_TO_BF16`` and ``_FRAGMENT_ONE_MUL`` themselves, run instruction by
    instruction on the CPU: every code at every position of every word of a stripe, scales 0
    to 191 and 0 to 128 (their exact ranges), against ``dequantize_mxfp4``."""
    from pdserve.kernels.mxfp4_tile import _FRAGMENT_ONE_MUL, _FRAGMENT_TO_BF16

    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (12, 16, 64), generator=gen)  # 12 stripes of 16 x 64
    packed = pack_fp4(codes.to(torch.uint8))  # [12, 16, 32]
    top = SMALL_SCALE_MAX if one_mul else 191
    scales = torch.randint(0, top + 1, (12, 16, 2), dtype=torch.uint8, generator=gen)
    scales[0, 0, 0], scales[-1, -1, -1] = 0, top
    want = dequantize_mxfp4(packed, scales, torch.bfloat16).view(torch.int16)  # [12, 16, 64]
    w, s = interleave_mxfp4(packed.clone(), scales.clone())
    words = w.reshape(12, 128, 4).view(torch.int32)[..., 0].long() & 0xFFFFFFFF  # [12, 128]
    sw = s.reshape(12, 8, 4).long()  # [stripe, g, (g grp0, g+8 grp0, g grp1, g+8 grp1)]
    lane = torch.arange(128) // 4  # word index -> lane
    g, t, j = lane // 4, lane % 4, torch.arange(128) % 4
    grp = j // 2
    s_g = sw[:, g, 2 * grp]  # [12, 128]
    s_g8 = sw[:, g, 2 * grp + 1]
    bias = 126 if one_mul else 63  # bf16x2 of 2**(s - 1) or of 2**(s - 64)
    bf = [((x + bias) << 7) * 0x10001 for x in (s_g, s_g8)]
    ptx = (_FRAGMENT_ONE_MUL if one_mul else _FRAGMENT_TO_BF16).value
    regs = _run_ptx(ptx, {"$4": words, "$5": bf[0], "$6": bf[1]})
    for reg, (dr, dc) in zip(("$0", "$1", "$2", "$3"), ((0, 0), (0, 8), (8, 0), (8, 8))):
        for c in (0, 1):
            got = ((regs[reg] >> (16 * c)) & 0xFFFF).to(torch.int32).to(torch.int16)
            col = 16 * j + dc + 2 * t + c
            assert codes[:, g + dr, col].unique().numel() == 16  # every code at this position
            assert torch.equal(got, want[:, g + dr, col])


def test_small_scales_found_with_the_fragment_layout():
    """``interleaved_copy`` tells whether every scale byte fits the one-multiply decode."""
    w = random_moe(2, 64, 64)
    assert w.interleaved_copy().small_scales and not w.small_scales
    s2 = w.s2.clone()
    s2[1, -1, -1] = SMALL_SCALE_MAX + 1
    assert not dataclasses.replace(w, s2=s2).interleaved_copy().small_scales
