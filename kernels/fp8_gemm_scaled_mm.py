"""FP8 block-scaled linear through cuBLAS: ``torch._scaled_mm`` with DeepSeek's scaling recipe
(activations 1 x 128, weights 128 x 128, float32 scales), which torch runs on sm_90 with
cuBLASLt's block-scaled GEMM (CUDA 12.9+). The ``scaled_mm`` backend of ``linear_fp8``.

cuBLAS wants the operands laid out its way: activations [M, K] row-major with M a multiple of
4 and their scales column-major (stride (1, M)); the weight column-major ([N, K] row-major seen
transposed) and its scales [K / 128, N / 128] with stride (1, K / 128) padded to a multiple of 4.
``act_quant`` writes the activations that way (the padding rows are left unwritten: each output
row reads its own input row, and the padded rows are sliced off). Shapes it does not take (K not
a whole number of 4 blocks, N not a multiple of 16) and batches below ``scaled_mm_from_m`` run the
Triton kernel, which splits K over the SMs where cuBLAS leaves them idle.

The reference is ``fp8_gemm_triton.fp8_block_linear_torch``; ``operands`` is what the CPU tests
check against it (cuBLAS cannot run there), the GPU tests the whole path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.kernels import fp8_gemm_triton
from pdserve.kernels.fp8_gemm_triton import GROUP, act_quant
from pdserve.kernels.triton_configs import scaled_mm_from_m

ROW_MULTIPLE = 4  # cuBLASLt's block-scaled GEMM wants M (and K's scale count) in fours


@dataclass(frozen=True)
class PreparedFp8:
    """One FP8 linear's weight as both kernels read it."""

    weight: torch.Tensor  # [N, K] float8_e4m3fn, row-major (cuBLAS reads it as [K, N] col-major)
    scale: torch.Tensor  # [ceil(N / 128), K / 128] float32, row-major (the Triton kernel's)
    cublas_from: int | None  # tokens from which cuBLAS runs; None: it does not take the weight

    @property
    def cublas_fits(self) -> bool:
        """Whether cuBLAS takes the weight: K in whole groups of 4 blocks, N in 16s."""
        return self.cublas_from is not None


def prepare(args: tuple[torch.Tensor, torch.Tensor, torch.dtype]) -> PreparedFp8:
    """The weight as both kernels read it, and its crossover, looked up once at load."""
    weight, scale, _ = args
    n, k = weight.shape
    fits = k % (GROUP * ROW_MULTIPLE) == 0 and n % 16 == 0
    first = scaled_mm_from_m(n, k) if fits else None
    return PreparedFp8(weight.contiguous(), scale.float().contiguous(), first)


def operands(
    x: torch.Tensor, p: PreparedFp8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch._scaled_mm``'s (a, b, scale_a, scale_b) for x [M, K]: a [Mp, K] E4M3 (Mp = M
    rounded up to 4), b [K, N] column-major, scale_a [Mp, K / 128] column-major, scale_b
    [K / 128, ceil(N / 128)] with stride (1, K / 128)."""
    m = x.shape[0]
    rows = -(-m // ROW_MULTIPLE) * ROW_MULTIPLE
    qa, sa = act_quant(x, rows=rows, column_major=True)
    return qa, p.weight.t(), sa, p.scale.t()


def scaled_mm_linear(x: torch.Tensor, p: PreparedFp8) -> torch.Tensor:
    """x [M, K] bf16 -> [M, N] bf16 through cuBLAS, whatever M."""
    a, b, sa, sb = operands(x, p)
    out = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=x.dtype)  # [Mp, N]
    return out[: x.shape[0]]


def linear(x: torch.Tensor, p: PreparedFp8) -> torch.Tensor:
    """The ``scaled_mm`` backend's linear: cuBLAS from ``p.cublas_from`` tokens on weights it
    takes, the Triton kernel below (and for float32 activations)."""
    x = x.contiguous()
    if p.cublas_from is None or x.shape[0] < p.cublas_from or x.dtype != torch.bfloat16:
        return fp8_gemm_triton.fp8_block_linear_triton(x, p.weight, p.scale)
    return scaled_mm_linear(x, p)


_PROBED: dict[int, str | None] = {}  # device index -> the probe's verdict


def unavailable() -> str | None:
    """Why cuBLAS's block-scaled GEMM cannot serve on the current CUDA device, or None. Runs
    one small product (M = 5, padded to 8; K = 1536: 12 activation groups) against the
    reference: a torch build without the recipe raises, and one with a scale-layout bug answers
    wrong. The verdict is kept per device; running out of memory is not a verdict."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    device = torch.cuda.current_device()
    if device not in _PROBED:
        try:
            _PROBED[device] = _probe(torch.device("cuda", device))
        except torch.OutOfMemoryError as e:
            return f"no GPU memory for the probe of cuBLAS's block-scaled GEMM: {e}"
    return _PROBED[device]


def _probe(device: torch.device) -> str | None:
    from pdserve.kernels.fp8_blocks import quantize_fp8_blocks

    g = torch.Generator(device=device).manual_seed(0)
    w, s = quantize_fp8_blocks(torch.randn(256, 1536, device=device, generator=g) * 0.05)
    x = torch.randn(5, 1536, device=device, generator=g).bfloat16()
    try:
        got = scaled_mm_linear(x, prepare((w, s, torch.bfloat16))).float()
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, ValueError) as e:  # torch without the recipe
        return f"torch {torch.__version__} has no 1x128 x 128x128 scaled_mm here: {e}"
    want = fp8_gemm_triton.fp8_block_linear_torch(x, w, s).float()
    err = float((got - want).norm() / want.norm())
    if not err < 2e-2:
        return f"torch {torch.__version__}'s block-scaled scaled_mm is {err:.3g} off the reference"
    return None
