"""copy_rows, Triton: row gathers and scatters against row_copy_reference."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels import row_copy_reference, row_copy_triton


def _case(dtype, rows, width, n, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(rows, width, generator=gen).to(dtype).to(device)
    dst = torch.randn(rows + 5, width, generator=gen).to(dtype).to(device)
    src_rows = torch.randperm(rows, generator=gen)[:n].to(device)  # any order, no repeats
    dst_rows = torch.randperm(rows + 5, generator=gen)[:n].to(device)
    return src, dst, src_rows, dst_rows


@pytest.mark.parametrize(
    "dtype, width",
    [
        (torch.bfloat16, 2304),  # rows of 4608 bytes: int64 words, more than one program
        (torch.float32, 37),  # 148 bytes: int32 words, a masked tile
        (torch.bfloat16, 3),  # 6 bytes: int16 words
        (torch.uint8, 7),  # 7 bytes: single bytes
    ],
)
@pytest.mark.parametrize("which", ["gather", "scatter", "both", "neither"])
def test_copy_rows_matches_reference(device, dtype, width, which):
    src, dst, src_rows, dst_rows = _case(dtype, 19, width, 11, device)
    if which in ("scatter", "neither"):
        src = src[:11].contiguous()  # the n rows in order
        src_rows = None
    if which in ("gather", "neither"):
        dst_rows = None
    want, got = dst.clone(), dst.clone()
    row_copy_reference.copy_rows(src, want, src_rows, dst_rows)
    row_copy_triton.copy_rows(src, got, src_rows, dst_rows)
    assert torch.equal(got, want)  # a copy: bit for bit, untouched rows too
    assert not torch.equal(got, dst)  # (and it did write)


def test_copy_rows_of_a_misaligned_view_narrows_the_word(device):
    """A view starting 2 bytes into its storage is copied as int16 words, not int64."""
    base = torch.arange(8 * 9, dtype=torch.int16, device=device)
    src = base[1:].view(71)[:64].view(8, 8)  # [8, 8] int16 rows at an address 2 bytes off
    dst = torch.zeros(8, 8, dtype=torch.int16, device=device)
    rows = torch.tensor([7, 0, 3], dtype=torch.int64, device=device)
    row_copy_triton.copy_rows(src, dst, src_rows=rows)
    assert torch.equal(dst[:3], src[rows])
    assert torch.equal(dst[3:], torch.zeros(5, 8, dtype=torch.int16, device=device))


def test_copy_rows_of_nothing_writes_nothing(device):
    dst = torch.ones(4, 8, device=device)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    row_copy_triton.copy_rows(torch.zeros(0, 8, device=device), dst, dst_rows=empty)
    assert torch.equal(dst, torch.ones(4, 8, device=device))
