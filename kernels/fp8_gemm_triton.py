"""FP8 block-scaled linear in Triton: y = x W^T with W float8 E4M3 and one float32 scale per
128 x 128 block (DeepSeek's release format, ``fp8_blocks.py``), x quantized on the fly to E4M3
per token in groups of 128 along K, as DeepSeek's own inference code does.

Two launches: ``act_quant`` (one program per token and 128-group: amax, scale, codes), then the
GEMM, whose K loop steps one 128-wide block at a time: an FP8 ``tl.dot`` per step (wgmma on
Hopper) into float32, scaled by the token's and the weight block's scales, summed. When the
output has few tiles (decode batches, narrow projections) K is split over more programs, whose
float32 partial sums one more kernel adds up (``split_k``). The reference
is ``fp8_block_linear_torch``; on CPU the tests run both under ``TRITON_INTERPRET=1``.
Tile sizes: ``triton_configs.FP8_LINEAR_TILES``, a first pick per M, not tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.device import sm_count
from pdserve.kernels.fp8_blocks import E4M3_MAX, FP8_BLOCK, expand_scales
from pdserve.kernels.triton_configs import fp8_linear_tiles

GROUP = FP8_BLOCK[1]  # activation scales: one per token per 128 values of K, as the weight's


@triton.jit
def _act_quant(
    x, q, s, K, stride_x, stride_q, stride_sm, stride_skb,
    GROUP: tl.constexpr, FP8_MAX: tl.constexpr,
):  # fmt: skip
    m, kb = tl.program_id(0).to(tl.int64), tl.program_id(1)
    k = kb * GROUP + tl.arange(0, GROUP)
    v = tl.load(x + m * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(v), axis=0)
    scale = tl.where(amax > 0, tl.div_rn(amax, FP8_MAX), 1.0)  # IEEE divisions, as torch's
    codes = tl.clamp(_e4m3_rne(tl.div_rn(v, scale)), -FP8_MAX, FP8_MAX)  # on E4M3's grid
    tl.store(q + m * stride_q + k, codes.to(q.dtype.element_ty), mask=k < K)
    tl.store(s + m * stride_sm + kb * stride_skb, scale)


@triton.jit
def _e4m3_rne(x):
    """x (float32) rounded to the nearest E4M3 value, ties to even, in float32 arithmetic: the
    cast after it is exact under any rounding mode (Triton's interpreter truncates)."""
    exp = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 |x|) for normals
    exp = tl.maximum(exp, -6)  # E4M3's subnormals share the smallest normal's step
    step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2 ** (exp - 3): 3 mantissa bits
    magic = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds to an integer, ties to even
    return ((x / step + magic) - magic) * step


def act_quant(
    x: torch.Tensor, rows: int | None = None, column_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [rows, K], float32 scales [rows, ceil(K / 128)]), rows >= M
    (default M): rows past M are left unwritten, for a GEMM that wants M padded. Scales
    ``column_major`` are stored [ceil(K / 128), rows] and returned transposed (stride (1, rows)),
    as cuBLAS's block-scaled GEMM reads them."""
    m, k = x.shape
    rows = m if rows is None else rows
    assert rows >= m, (rows, m)
    kb = triton.cdiv(k, GROUP)
    q = torch.empty((rows, k), dtype=torch.float8_e4m3fn, device=x.device)
    if column_major:
        s = torch.empty((kb, rows), dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty((rows, kb), dtype=torch.float32, device=x.device)
    if m:
        _act_quant[(m, kb)](
            x, q, s, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1), GROUP, E4M3_MAX
        )
    return q, s


@triton.jit
def _gemm(
    a, a_s, b, b_s, c,
    M, N, K, KB, KB_PER,
    stride_a, stride_b, stride_c, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (m, n, s) sums K blocks [s * KB_PER, (s + 1) * KB_PER) of its output tile into
    ``c`` (split s of a float32 [splits, M, N] buffer when K is split, else the output)."""
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # int64 rows and columns: offsets of M x N outputs and M x K inputs pass 2**31
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(split * KB_PER, tl.minimum(split * KB_PER + KB_PER, KB)):
        k = kb * BLOCK_K + rk
        at = tl.load(
            a + rm[:, None] * stride_a + k[None, :],
            mask=(rm[:, None] < M) & (k[None, :] < K),
            other=0.0,
        )  # [BM, BK] fp8
        bt = tl.load(
            b + rn[None, :] * stride_b + k[:, None],
            mask=(rn[None, :] < N) & (k[:, None] < K),
            other=0.0,
        )  # [BK, BN] fp8
        sa = tl.load(a_s + rm * KB + kb, mask=rm < M, other=0.0)  # [BM]
        # the weight's blocks are BLOCK_K x BLOCK_K (128 x 128): rows rn share scale row rn // 128
        sb = tl.load(b_s + (rn // BLOCK_K) * KB + kb, mask=rn < N, other=0.0)  # [BN]
        acc += tl.dot(at, bt, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
    out = acc.to(c.dtype.element_ty)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    c += split.to(tl.int64) * stride_split
    tl.store(c + rm[:, None] * stride_c + rn[None, :], out, mask=mask)


def _num_sms(device: torch.device) -> int:
    """``sm_count``'s, but 1 under the interpreter (one program at a time)."""
    return sm_count(device) if device.type == "cuda" else 1


def split_k(m: int, n: int, kb: int, device: torch.device) -> int:
    """How many pieces to split K into: a few output tiles (a decode batch, a narrow projection)
    leave most SMs idle while each walks the whole K; split until about one program per SM,
    each piece at least 4 of the K blocks, 16 pieces at most."""
    bm, bn, _, _ = fp8_linear_tiles(m)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    return max(1, min(_num_sms(device) // tiles, kb // 4, 16))


def fp8_block_linear_triton(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, splits: int | None = None
) -> torch.Tensor:
    """x [M, K] (bf16 / fp32) @ weight [N, K] float8 with block scales [ceil(N/128),
    ceil(K/128)] -> [M, N] in x's dtype. ``splits``: K split in that many pieces, summed in
    float32 after (default ``split_k``'s choice for the device)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.dtype == torch.float8_e4m3fn, (x.shape, weight.shape)
    kb = triton.cdiv(k, GROUP)
    assert scale.shape == (triton.cdiv(n, GROUP), kb), (scale.shape, weight.shape)
    qa, sa = act_quant(x)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    bm, bn, warps, stages = fp8_linear_tiles(m)
    splits = split_k(m, n, kb, x.device) if splits is None else max(1, min(splits, kb))
    per = triton.cdiv(kb, splits)
    splits = triton.cdiv(kb, per)  # no empty piece
    dst = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
    _gemm[grid](
        qa, sa, weight, scale.contiguous(), dst, m, n, k, kb, per,
        qa.stride(0), weight.stride(0), n, m * n,
        bm, bn, GROUP, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if splits > 1:
        out.copy_(dst.sum(0))
    return out


def prepare(args: tuple[torch.Tensor, torch.Tensor, torch.dtype]) -> tuple[torch.Tensor, ...]:
    """The ``triton`` backend of ``linear_fp8``: the weight stays FP8 (half bf16's bytes)."""
    weight, scale, _ = args
    return weight.contiguous(), scale.float().contiguous()


def linear(x: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    weight, scale = prepared
    return fp8_block_linear_triton(x.contiguous(), weight, scale)


def act_quant_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of ``act_quant``."""
    m, k = x.shape
    kb = -(-k // GROUP)
    xf = torch.nn.functional.pad(x.float(), (0, kb * GROUP - k)).view(m, kb, GROUP)
    amax = xf.abs().amax(dim=-1)  # [M, KB]
    # by a tensor, not a Python number: CUDA's torch multiplies by a scalar divisor's reciprocal
    scale = torch.where(amax > 0, amax / torch.full_like(amax, E4M3_MAX), torch.ones_like(amax))
    codes = (xf / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).view(m, kb * GROUP)[:, :k]
    return codes.to(torch.float8_e4m3fn), scale


def fp8_block_linear_torch(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """The reference: both operands quantized as the kernel has them, dequantized, multiplied
    in float32."""
    qa, sa = act_quant_torch(x)
    a = qa.float() * expand_scales(sa, qa.shape, (1, GROUP))
    w = weight.float() * expand_scales(scale, weight.shape)
    return (a @ w.T).to(x.dtype)
