"""Row copies between 2-D tensors, in PyTorch: op ``copy_rows``, the CPU path and the test oracle
of ``row_copy_triton``."""

from __future__ import annotations

import torch


def copy_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_rows: torch.Tensor | None = None,
    dst_rows: torch.Tensor | None = None,
) -> None:
    """``dst[dst_rows[i]] = src[src_rows[i]]`` for every i (a missing index is ``arange``):
    ``src`` [R_src, W] and ``dst`` [R_dst, W] of one dtype; ``src_rows`` / ``dst_rows`` [n]
    int64, ``dst_rows`` without repeats."""
    picked = src if src_rows is None else src.index_select(0, src_rows)  # [n, W]
    if dst_rows is None:
        dst[: picked.shape[0]].copy_(picked)
    else:
        dst.index_copy_(0, dst_rows, picked)
