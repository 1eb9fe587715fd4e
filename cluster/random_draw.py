"""Random tensors drawn fast for random checkpoints: normal values and MXFP4 codes, filled in
pieces on every core, the values depending on the seed alone."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from pdserve.kernels.mxfp4 import BLOCK, WORD_RANGE, scale_for_std

PIECE = 1 << 22  # elements a thread fills at a time


def parallel(out: torch.Tensor, fill: Callable, g: torch.Generator) -> torch.Tensor:
    """Fill ``out`` in pieces along its first dim on every core: ``fill(piece, generator)``,
    each piece's generator seeded from one draw of ``g`` and its index, so the values depend on
    the seed alone, not on the number of threads."""
    base = int(torch.randint(0, 2**62, (1,), generator=g))
    rows = max(1, PIECE // max(1, out[0].numel())) if out.dim() > 1 else out.shape[0]
    starts = list(range(0, out.shape[0], rows))

    def one(i: int) -> None:
        fill(out[starts[i] : starts[i] + rows], torch.Generator().manual_seed(base + i))

    with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(starts))))  # torch releases the GIL while it draws
    return out


def normal(
    shape: tuple[int, ...], std: float, g: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    if g.device.type != "cpu":  # a GPU draws fast enough alone
        return torch.randn(shape, generator=g, device=g.device).mul_(std).to(dtype)

    def fill(piece: torch.Tensor, gen: torch.Generator) -> None:
        piece.copy_(torch.randn(piece.shape, generator=gen).mul_(std))

    return parallel(torch.empty(shape, dtype=dtype), fill, g)


def mxfp4(shape: tuple[int, ...], std: float, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``random_mxfp4``'s codes and scales, drawn on every core: packed bytes straight from
    random 64-bit words (uniform bytes are two uniform E2M1 codes)."""
    *lead, k = shape
    dev = g.device
    scales = torch.full((*lead, k // BLOCK), scale_for_std(std), dtype=torch.uint8, device=dev)
    if dev.type != "cpu":
        n = math.prod(lead) * k // 16  # 64-bit words: K is a multiple of 32
        words = torch.randint(*WORD_RANGE, (n,), dtype=torch.int64, generator=g, device=dev)
        return words.view(torch.uint8).view(*lead, k // 2), scales

    def fill(piece: torch.Tensor, gen: torch.Generator) -> None:
        words = piece.view(-1).view(torch.int64)
        torch.randint(*WORD_RANGE, words.shape, dtype=torch.int64, generator=gen, out=words)

    packed = parallel(torch.empty((*lead, k // 2), dtype=torch.uint8), fill, g)
    return packed, scales
