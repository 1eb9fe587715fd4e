"""Triton row copies: op ``copy_rows``, backend ``triton``. Contract: ``row_copy_reference``.

Moves whole rows between 2-D tensors through row ids, for a KV transfer's blocks (a row is one
block of one layer: 73 KB in DeepSeek-V2-Lite's layout). PyTorch's ``index_copy_`` scatters such
rows at about a third of copy speed on an H200 (``bench.kv_copy``); here each program copies one
BLOCK-word tile of one row as the widest integer words the row's bytes allow, so the scatter
runs at the speed of a plain copy, and the program is short enough that a kernel on a
higher-priority stream (the transfer's NCCL messages) gets SMs as soon as it needs them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # words per program (8 KB as int64)
NUM_WARPS = 4


@triton.jit
def _copy_rows_kernel(
    src_ptr, dst_ptr, src_rows_ptr, dst_rows_ptr, width,
    HAS_SRC_ROWS: tl.constexpr, HAS_DST_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)  # which row of the copy
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # words within the row
    mask = offs < width
    s = tl.load(src_rows_ptr + i) if HAS_SRC_ROWS else i.to(tl.int64)
    d = tl.load(dst_rows_ptr + i) if HAS_DST_ROWS else i.to(tl.int64)
    x = tl.load(src_ptr + s * width + offs, mask=mask)
    tl.store(dst_ptr + d * width + offs, x, mask=mask)


_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _word_bytes(row_bytes: int, *tensors: torch.Tensor) -> int:
    """The widest integer word (8, 4, 2 or 1 bytes) that divides a row and every address."""
    return next(
        k for k in _INT if row_bytes % k == 0 and all(t.data_ptr() % k == 0 for t in tensors)
    )


def copy_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_rows: torch.Tensor | None = None,
    dst_rows: torch.Tensor | None = None,
) -> None:
    """``dst[dst_rows[i]] = src[src_rows[i]]`` for every i (a missing index is ``arange``),
    queued on the current stream: ``src`` [R_src, W] and ``dst`` [R_dst, W] contiguous, of one
    dtype; ``src_rows`` / ``dst_rows`` [n] int64 on their device, ``dst_rows`` without
    repeats."""
    assert src.dim() == dst.dim() == 2 and src.shape[1] == dst.shape[1], (src.shape, dst.shape)
    assert src.dtype == dst.dtype and src.is_contiguous() and dst.is_contiguous()
    n = (src_rows if src_rows is not None else dst_rows if dst_rows is not None else src).shape[0]
    for rows in (src_rows, dst_rows):
        assert rows is None or rows.dtype == torch.int64 and rows.shape == (n,), rows
    if n == 0 or src.shape[1] == 0:
        return
    row_bytes = src.shape[1] * src.element_size()
    k = _word_bytes(row_bytes, src, dst)
    a, b = src.view(torch.uint8).view(_INT[k]), dst.view(torch.uint8).view(_INT[k])  # [R, words]
    width = row_bytes // k
    grid = (n, triton.cdiv(width, BLOCK))
    _copy_rows_kernel[grid](
        a, b, src_rows if src_rows is not None else a, dst_rows if dst_rows is not None else b,
        width, HAS_SRC_ROWS=src_rows is not None, HAS_DST_ROWS=dst_rows is not None,
        BLOCK=BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip
