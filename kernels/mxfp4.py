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


# The MMA-fragment layout ("interleaved" codes), made once at load for the Triton MoE kernels.
# Every stripe of 16 rows and 64 columns (1024 codes, 512 bytes) is re-ordered so that lane
# L = 4g + t of a warp loads, with one 16-byte load, the four 32-bit words j = 0..3 that hold
# exactly its share of Hopper's MMA A operand for the 16 x 16 blocks j of the stripe: rows g and
# g + 8, columns 16j + 2t + {0, 1} and 16j + 8 + 2t + {0, 1}. Word (stripe, kb, L, j) sits at
# byte offset 512 kb + 16 L + 4 j of the stripe's 16 rows (rows stay in their stripe, so the
# tensor keeps its shape [..., N, K/2]). In a word, 16-bit lane c (0: low) holds the codes of
# column 2t + c (+ 16j, + 8 for B and D), bit-interleaved so that masking gives bfloat16 bits:
# a code's sign at bit 15 and its exponent and mantissa bits at 8..6 make E2M1 * 2**-126.
#   A: row g,     col +0   sign 15, bits 8..6       (w & M, M = 0x81C081C0 on both lanes)
#   B: row g,     col +8   sign 12, bits 5..3       ((w << 3) & M)
#   C: row g + 8, col +0   sign 9,  bits 2..0       ((w << 6) & M)
#   D: row g + 8, col +8   sign 14, exponent bits 11, 10, mantissa bit 13 (three shifts)
# Scales: a stripe's 16 rows x K/32 bytes become, per 64 columns kb, 8 words (one per g) of bytes
# (row g, group 2kb), (row g + 8, group 2kb), (row g, group 2kb + 1), (row g + 8, group 2kb + 1).
FRAGMENT_ROWS, FRAGMENT_COLS = 16, 64  # the layout's stripe: N and K must be multiples


def fragment_layout_fits(n: int, k: int) -> bool:
    """Whether codes [..., n, k/2] can take the fragment layout."""
    return n % FRAGMENT_ROWS == 0 and k % FRAGMENT_COLS == 0


def _lanes(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Codes A, B, C, D (int32, 0..15) -> their 16-bit lane."""
    out = torch.zeros_like(a)
    for code, shift in ((a, 0), (b, 3), (c, 6)):
        out |= ((code >> 3) & 1) << (15 - shift) | (code & 7) << (6 - shift)
    return out | ((d >> 3) & 1) << 14 | ((d >> 2) & 1) << 11 | ((d >> 1) & 1) << 10 | (d & 1) << 13


def _lane_codes(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inverse of ``_lanes``: a 16-bit lane -> codes A, B, C, D."""
    codes = [((x >> (15 - sh)) & 1) << 3 | (x >> (6 - sh)) & 7 for sh in (0, 3, 6)]
    d = (x >> 14 & 1) << 3 | (x >> 11 & 1) << 2 | (x >> 10 & 1) << 1 | (x >> 13 & 1)
    return (*codes, d)


def _check_fragment(packed: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    *lead, n, half = packed.shape
    k = 2 * half
    if not fragment_layout_fits(n, k) or tuple(scales.shape) != (*lead, n, k // BLOCK):
        raise ValueError(
            f"the fragment layout needs codes [..., N, K/2] with N % {FRAGMENT_ROWS} == 0 and "
            f"K % {FRAGMENT_COLS} == 0 and scales [..., N, K/32]: got codes "
            f"{tuple(packed.shape)}, scales {tuple(scales.shape)}"
        )
    assert packed.dtype == torch.uint8 and scales.dtype == torch.uint8
    return n, k


def interleave_mxfp4(
    packed: torch.Tensor, scales: torch.Tensor, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [..., N, K/2], scales [..., N, K/32]) -> the same in the fragment layout (above),
    written in place; ``inverse`` undoes it. Leading dims (experts) go one matrix at a time, so
    the int32 temporaries stay the size of one expert."""
    n, k = _check_fragment(packed, scales)
    for codes, sc in zip(packed.view(-1, n, k // 2), scales.view(-1, n, k // BLOCK)):
        _interleave_matrix(codes, sc, n, k, inverse)
    return packed, scales


def _interleave_matrix(
    packed: torch.Tensor, scales: torch.Tensor, n: int, k: int, inverse: bool
) -> None:
    """``interleave_mxfp4`` of one matrix: codes [N, K/2], scales [N, K/32], in place."""
    # codes [N/16, r, g, kb, j, h, t, c] <-> words [N/16, kb, g, t, j] of lanes c
    dims = (n // 16, 2, 8, k // 64, 4, 2, 4, 2)
    to_words = (0, 3, 2, 6, 4, 7, 1, 5)  # [N/16, kb, g, t, j, c, r, h]
    sdims = (n // 16, 2, 8, k // 64, 2)  # [N/16, r, g, kb, group]
    to_sw = (0, 3, 2, 4, 1)  # [N/16, kb, g, group, r]
    if not inverse:
        codes = unpack_fp4(packed).to(torch.int32).reshape(dims).permute(to_words)
        lanes = _lanes(*(codes[..., r, h] for r in (0, 1) for h in (0, 1)))  # [.., j, c]
        words = lanes[..., 0] | lanes[..., 1] << 16  # [N/16, kb, g, t, j]
        packed.copy_(words.contiguous().view(torch.uint8).reshape(packed.shape))
        scales.copy_(scales.reshape(sdims).permute(to_sw).clone().reshape(scales.shape))
        return
    words = packed.reshape(-1, 4).view(torch.int32).reshape(n // 16, k // 64, 8, 4, 4)
    grid = torch.empty((*words.shape, 2, 2, 2), dtype=torch.int32, device=packed.device)
    for c in (0, 1):  # grid [.., c, r, h]
        a, b, c_, d = _lane_codes((words >> (16 * c)) & 0xFFFF)
        grid[..., c, :, :] = torch.stack((a, b, c_, d), -1).reshape(*words.shape, 2, 2)
    codes = torch.empty(dims, dtype=torch.int32, device=packed.device)
    codes.permute(to_words).copy_(grid)
    packed.copy_(pack_fp4(codes.reshape(n, k)))
    sw = torch.empty(sdims, dtype=torch.uint8, device=scales.device)
    sw.permute(to_sw).copy_(scales.reshape(n // 16, k // 64, 8, 2, 2))
    scales.copy_(sw.reshape(scales.shape))
