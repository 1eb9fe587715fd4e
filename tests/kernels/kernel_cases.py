"""Shared inputs for the kernel tests: random MXFP4 experts, routing, model shapes, poisoning."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.kernels.moe_reference import MoeWeights, SwiGLU
from pdserve.kernels.mxfp4 import E8M0_BIAS

GPT_OSS_ACT = SwiGLU(alpha=1.702, beta=1.0, limit=7.0)


@dataclass(frozen=True)
class MoeShape:
    name: str
    hidden: int
    experts: int
    top_k: int
    inter: int
    act: SwiGLU = SwiGLU()
    bias: bool = False


DEEPSEEK_V3 = MoeShape("deepseek-v3", 7168, 256, 8, 2048)
DEEPSEEK_V2_LITE = MoeShape("deepseek-v2-lite", 2048, 64, 6, 1408)
GPT_OSS_120B = MoeShape("gpt-oss-120b", 2880, 128, 4, 2880, GPT_OSS_ACT, bias=True)
REAL_MOE_SHAPES = (DEEPSEEK_V3, DEEPSEEK_V2_LITE, GPT_OSS_120B)


def _mxfp4(shape: tuple[int, ...], std: float, device, gen: torch.Generator) -> tuple:
    """Random bytes (all 16 codes in both nibbles) and scales spread over 4 powers of two."""
    *lead, k = shape
    packed = torch.randint(0, 256, (*lead, k // 2), dtype=torch.uint8, device=device, generator=gen)
    base = E8M0_BIAS + round(torch.log2(torch.tensor(std / 3.1)).item())
    scales = torch.randint(
        base - 2, base + 2, (*lead, k // 32), dtype=torch.uint8, device=device, generator=gen
    )
    return packed, scales


def random_moe(
    experts: int,
    hidden: int,
    inter: int,
    *,
    bias: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MoeWeights:
    """Experts whose outputs keep activations near unit scale (std ~ 1/sqrt(fan-in))."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w13, s13 = _mxfp4((experts, 2 * inter, hidden), hidden**-0.5, device, gen)
    w2, s2 = _mxfp4((experts, hidden, inter), inter**-0.5, device, gen)
    b13 = b2 = None
    if bias:
        b13 = (0.5 * torch.randn(experts, 2 * inter, device=device, generator=gen)).to(dtype)
        b2 = (0.5 * torch.randn(experts, hidden, device=device, generator=gen)).to(dtype)
    return MoeWeights(w13, s13, w2, s2, b13, b2)


def random_routing(
    m: int, experts: int, top_k: int, *, device="cpu", seed: int = 0, invalid: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct top-k experts per token and their weights; ``invalid`` plants ids -1 and E."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(m, experts, device=device, generator=gen)
    weights, ids = scores.topk(top_k, dim=-1)  # [M, K]
    if invalid and m > 0:
        ids[0, -1] = -1
        ids[m // 2, 0] = experts
        ids[-1, top_k // 2] = experts + 7
    return ids, weights.float()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or overflowed elements)"
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def nan_like(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A poisoned output buffer: every element the kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def poison_cuda_allocator(nbytes: int = 1 << 30) -> None:
    """Fill freed cached CUDA memory with NaN so that kernel scratch buffers start poisoned."""
    junk = torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device="cuda")
    del junk


def fp8_case(m: int, n: int, k: int, device, seed: int = 0):
    """x [M, K] float32 with activation groups of unlike sizes, and an [N, K] weight quantized to
    FP8 with its 128x128 block scales, on ``device``."""
    from pdserve.kernels.fp8_blocks import quantize_fp8_blocks

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)  # groups of unlike sizes
    w, s = quantize_fp8_blocks(torch.randn(n, k, generator=g) * 0.05)
    return x.to(device), w.to(device), s.to(device)


def assert_fp8_gemm_close(got: torch.Tensor, x: torch.Tensor, weight, scale) -> None:
    """The FP8 block linear's output against its reference, taken in float64 on the CPU. The
    interpreter sums in float32: equal to 1e-5. Hopper's FP8 MMA keeps about 14 bits of its
    accumulator within one 128-wide K block (DeepSeek-V3's report, section 3.3.2), so on a GPU
    each element may be off by a small share of the sum of |a * w| over K: at most 2**-9 of it
    here, far below a wrong scale or block (errors of the size of the output itself)."""
    from pdserve.kernels.fp8_blocks import expand_scales
    from pdserve.kernels.fp8_gemm_triton import GROUP, act_quant_torch

    qa, sa = act_quant_torch(x.cpu())
    a = qa.double() * expand_scales(sa, qa.shape, (1, GROUP)).double()
    w = weight.cpu().double() * expand_scales(scale.cpu(), weight.shape).double()
    want, size = a @ w.T, a.abs() @ w.abs().T
    err = (got.cpu().double() - want).abs()
    if got.device.type == "cpu":
        bound = 1e-5 + 1e-5 * want.abs()
    else:
        bound = 1e-6 + 2.0**-9 * size
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{int((err > bound).sum())} of {err.numel()} elements off; the worst by "
        f"{err.flatten()[worst]:.3g} (bound {bound.flatten()[worst]:.3g})"
    )
