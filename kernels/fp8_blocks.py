"""FP8 block-scaled weights, as DeepSeek publishes them (DeepSeek-V3/V3.1/R1, Kimi-K2).

A weight ``[out, in]`` is stored as float8 E4M3 elements with one float32 scale per 128 x 128
block (``weight_scale_inv`` ``[ceil(out / 128), ceil(in / 128)]``; edge blocks are partial). The
value is ``fp8 * scale`` (the name's "inv": the scale that undoes the quantizer's division).
Everything here is the PyTorch reference: the loader dequantizes with it, and random
checkpoints are written with it.
"""

from __future__ import annotations

import math

import torch

FP8_BLOCK = (128, 128)  # the only block shape DeepSeek's checkpoints use, and the one we load
E4M3_MAX = 448.0  # largest finite float8_e4m3fn magnitude


def _scale_grid(shape: torch.Size, block: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"FP8 block weights are 2-D [out, in], got shape {tuple(shape)}")
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def expand_scales(
    scale: torch.Tensor, shape: torch.Size, block: tuple[int, int] = FP8_BLOCK
) -> torch.Tensor:
    """Block scales [ceil(out / bo), ceil(in / bi)] -> one per element [out, in], float32."""
    grid = _scale_grid(shape, block)
    if tuple(scale.shape) != grid:
        raise ValueError(
            f"FP8 block scales of shape {tuple(scale.shape)} for a weight of shape "
            f"{tuple(shape)} in {block[0]}x{block[1]} blocks; expected {grid}"
        )
    s = scale.float().repeat_interleave(block[0], 0)[: shape[0]]
    return s.repeat_interleave(block[1], 1)[:, : shape[1]]


def dequantize_fp8_blocks(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = FP8_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(float8 weight [out, in], float32 scales per block) -> values [out, in] in ``dtype``;
    the product is taken in float32."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"FP8 block weights must be float8_e4m3fn, got {weight.dtype}")
    return (weight.float() * expand_scales(scale_inv, weight.shape, block)).to(dtype)


def quantize_fp8_blocks(
    w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK, power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], float32 scales [ceil(out/bo), ceil(in/bi)]).

    Each block's scale maps its largest magnitude to E4M3's 448 (an all-zero block gets 1).
    ``power_of_two`` rounds each scale up to a power of two: values already on a coarser grid
    (MXFP4's, say) then divide exactly and come back unchanged."""
    grid = _scale_grid(w.shape, block)
    wf = w.float()
    pad = (0, grid[1] * block[1] - w.shape[1], 0, grid[0] * block[0] - w.shape[0])
    tiles = torch.nn.functional.pad(wf, pad).reshape(grid[0], block[0], grid[1], block[1])
    amax = tiles.abs().amax(dim=(1, 3))  # [grid_out, grid_in]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    codes = (wf / expand_scales(scale, w.shape, block)).clamp(-E4M3_MAX, E4M3_MAX)
    return codes.to(torch.float8_e4m3fn), scale


def prepare_dense(args: tuple[torch.Tensor, torch.Tensor, torch.dtype]) -> torch.Tensor:
    """The ``torch`` backend of ``linear_fp8``: (fp8 weight, scales, dtype) -> the dequantized
    weight, once at load."""
    weight, scale, dtype = args
    return dequantize_fp8_blocks(weight, scale, dtype=dtype)


def linear_dense(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight)
