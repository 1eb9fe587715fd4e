"""Float32 to the model dtype, rounded to nearest even in float32 arithmetic, for kernels that
must equal PyTorch's elementwise results bit for bit: on a GPU a plain cast rounds to nearest
even already, but Triton's interpreter (the CPU tests) truncates to bfloat16."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_dtype_rne(x, DTYPE: tl.constexpr):
    """x (float32) as DTYPE; bfloat16 rounded to nearest even by its bits first (finite x), so
    the cast after it is exact under any rounding mode."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + ((bits >> 16) & 1) + 0x7FFF  # half of the dropped part, ties to even
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)  # shifts keep uint32
    return x.to(DTYPE)
