"""MXFP4 (OCP Microscaling v1.0): E2M1 elements in blocks of 32 sharing one E8M0 scale.

Layout, as in GPT-OSS checkpoints: blocks of 32 run along the last (input / reduction) dim; two
E2M1 codes per byte, the low nibble holding the even element; packed bytes ``[..., K // 2]`` and
scale bytes ``[..., K // 32]``. Everything here is exact: a dequantized value is
``E2M1[code] * 2 ** (scale - 127)``, representable in float32 and bfloat16 alike.
"""

from __future__ import annotations

import math

import torch

BLOCK = 32  # elements sharing one E8M0 scale
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E2M1_EMAX = 2  # exponent of the largest E2M1 magnitude (6 = 1.5 * 2**2)
E2M1_MAX = 6.0

# code -> value; codes 8..15 are the negations of 0..7 (0x8 is -0.0)
E2M1_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)

# Midpoints between neighbouring magnitudes. A value equal to a midpoint rounds to the even code
# (mantissa bit 0): down at 0.25, 1.25, 2.5, 5.0 and up at 0.75, 1.75, 3.5.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (False, True, False, True, False, True, False)


def e2m1_lut(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry code -> float32 table."""
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0..15) -> float32 values."""
    return e2m1_lut(codes.device)[codes.long()]


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """float -> uint8 E2M1 codes: round to nearest, ties to even, saturate at +-6, keep the sign."""
    x = x.float()
    mag = x.abs().clamp(max=E2M1_MAX)
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for mid, tie_up in zip(_MIDPOINTS, _TIES_UP):
        code += (mag > mid) | ((mag == mid) & tie_up)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def e8m0_decode(scales: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 bytes -> float32 powers of two (0xFF -> NaN)."""
    s = scales.to(torch.int32)
    out = torch.ldexp(torch.ones_like(s, dtype=torch.float32), s - E8M0_BIAS)
    return torch.where(s == E8M0_NAN, torch.full_like(out, float("nan")), out)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., K] uint8 -> bytes [..., K // 2]; element 2i low nibble, 2i+1 high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of FP4 codes: last dim {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """bytes [..., K // 2] uint8 -> codes [..., K]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] -> (packed [..., K // 2] uint8, scales [..., K // 32] uint8), the OCP rule.

    Per block: shared exponent = floor(log2(amax)) - 2, clamped to E8M0's range; each element
    divided by 2**shared, rounded to nearest even on the E2M1 grid, saturated at 6. An all-zero
    block gets the smallest scale. Exactly representable inputs come back unchanged through
    ``dequantize_mxfp4``, and quantizing a dequantized tensor gives the same bytes again.
    """
    k = w.shape[-1]
    if k % BLOCK:
        raise ValueError(f"MXFP4 needs the input dim to be a multiple of {BLOCK}, got {k}")
    wf = w.float()
    if not torch.isfinite(wf).all():
        raise ValueError("cannot quantize non-finite weights to MXFP4")
    blocks = wf.reshape(*wf.shape[:-1], k // BLOCK, BLOCK)  # [..., K/32, 32]
    amax = blocks.abs().amax(dim=-1)  # [..., K/32]
    # frexp: amax = m * 2**e with m in [0.5, 1), so floor(log2(amax)) = e - 1, exactly
    _, exp = torch.frexp(amax)
    shared = torch.where(amax > 0, exp - 1 - E2M1_EMAX, torch.full_like(exp, -E8M0_BIAS))
    shared = shared.clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = torch.ldexp(blocks, -shared.unsqueeze(-1))  # exact: multiplies by a power of two
    codes = e2m1_encode(scaled).reshape(wf.shape)
    return pack_fp4(codes), (shared + E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp4(
    packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(packed [..., K // 2], scales [..., K // 32]) -> values [..., K] in ``dtype``."""
    k = packed.shape[-1] * 2
    if scales.shape[-1] * BLOCK != k or scales.shape[:-1] != packed.shape[:-1]:
        raise ValueError(
            f"MXFP4 shapes disagree: packed {tuple(packed.shape)}, scales {tuple(scales.shape)}"
        )
    vals = e2m1_decode(unpack_fp4(packed))  # [..., K]
    vals = vals.reshape(*vals.shape[:-1], k // BLOCK, BLOCK)
    exp = scales.to(torch.int32).unsqueeze(-1) - E8M0_BIAS
    out = torch.ldexp(vals, exp).reshape(*packed.shape[:-1], k)
    return out.to(dtype)


def random_mxfp4(
    shape: tuple[int, ...], std: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 weights [..., K] whose dequantized values have roughly the given std.

    Codes are uniform over the 16 E2M1 codes (std of the grid about 3.1) and every block gets the
    power-of-two scale nearest to ``std / 3.1``: a random checkpoint is cheap at any size. The
    packed bytes are drawn directly, eight at a time as random 64-bit words: uniform bytes are
    two independent uniform codes each.
    """
    *lead, k = shape
    if k % BLOCK:
        raise ValueError(f"MXFP4 needs the input dim to be a multiple of {BLOCK}, got {k}")
    nbytes = math.prod(lead) * k // 2  # a multiple of 16: K is a multiple of 32
    words = torch.randint(*WORD_RANGE, (nbytes // 8,), dtype=torch.int64, generator=generator)
    scales = torch.full((*lead, k // BLOCK), scale_for_std(std), dtype=torch.uint8)
    return words.view(torch.uint8).view(*lead, k // 2), scales


WORD_RANGE = (-(2**63), 2**63 - 1)  # torch.randint bounds for (nearly) uniform 64-bit words


def scale_for_std(std: float) -> int:
    """The E8M0 scale code that gives uniform random E2M1 codes (std about 3.1) about ``std``."""
    return E8M0_BIAS + round(math.log2(std / 3.1))


# Bit-interleaved codes: each 32-bit word (4 packed bytes, 8 codes c0..c7 of one 32-block,
# c_{2i} the low nibble of byte i) re-laid out once at load so that the Triton MoE kernels turn a
# word into 8 bfloat16 values with about two instructions per pair. A code's sign goes to bit 15
# of a 16-bit lane and its exponent and mantissa bits to bits 8..6, so that masking the lane
# gives E2M1 * 2**-126 as a bfloat16 (code 1 a subnormal). Lane 0 (bits 0..15) holds c0 there,
# c4 three bits lower (sign 12, bits 5..3), c1 six bits lower (sign 9, bits 2..0) and c5 in the
# four bits left (sign 14, exponent bits 11 and 10, mantissa bit 13); lane 1 likewise c2, c6, c3,
# c7. Then ``w & M``, ``(w << 3) & M`` and ``(w << 6) & M`` with M = 0x81C081C0 are the bf16x2
# pairs (c0, c2), (c4, c6), (c1, c3), and shifts of the spare bits give (c5, c7).
_LANE_CODES = ((0, 4, 1, 5), (2, 6, 3, 7))  # lane -> codes at shifts 0, 3, 6 and in the spare bits


def _lane(codes: list[torch.Tensor], lane: int) -> torch.Tensor:
    a, b, c, d = (codes[i] for i in _LANE_CODES[lane])
    out = torch.zeros_like(a)
    for code, shift in ((a, 0), (b, 3), (c, 6)):
        out |= ((code >> 3) & 1) << (15 - shift) | (code & 7) << (6 - shift)
    return out | ((d >> 3) & 1) << 14 | ((d >> 2) & 1) << 11 | ((d >> 1) & 1) << 10 | (d & 1) << 13


def interleave_fp4_words(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[..., K // 2]`` packed codes (K a multiple of 8) -> the same shape, each 32-bit
    word's codes bit-interleaved (see above); ``deinterleave_fp4_words`` inverts it. ``out``
    (``packed`` itself, say) receives them. A 3-d tensor (experts) goes one leading index at a
    time, so the int32 temporaries stay the size of one expert."""
    assert packed.dtype == torch.uint8 and packed.shape[-1] % 4 == 0, packed.shape
    out = torch.empty_like(packed) if out is None else out
    if packed.dim() == 3:
        for e in range(packed.shape[0]):
            interleave_fp4_words(packed[e], out=out[e])
        return out
    b = packed.reshape(-1, 4).to(torch.int32)  # [words, 4]
    codes = [c for i in range(4) for c in (b[:, i] & 0xF, b[:, i] >> 4)]  # c0 .. c7
    word = _lane(codes, 0) | _lane(codes, 1) << 16
    words = torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], dim=-1)
    out.copy_(words.reshape(packed.shape))
    return out


def deinterleave_fp4_words(words: torch.Tensor) -> torch.Tensor:
    """The inverse of ``interleave_fp4_words``."""
    assert words.dtype == torch.uint8 and words.shape[-1] % 4 == 0, words.shape
    b = words.reshape(-1, 4).to(torch.int32)
    w = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24  # [words]
    codes: list[torch.Tensor] = [w] * 8  # each replaced below
    for lane in (0, 1):
        x = (w >> (16 * lane)) & 0xFFFF
        a, b_, c, d = _LANE_CODES[lane]
        for i, shift in ((a, 0), (b_, 3), (c, 6)):
            codes[i] = ((x >> (15 - shift)) & 1) << 3 | (x >> (6 - shift)) & 7
        codes[d] = (x >> 14 & 1) << 3 | (x >> 11 & 1) << 2 | (x >> 10 & 1) << 1 | (x >> 13 & 1)
    out = torch.stack([codes[2 * i] | codes[2 * i + 1] << 4 for i in range(4)], dim=-1)
    return out.to(torch.uint8).reshape(words.shape)
