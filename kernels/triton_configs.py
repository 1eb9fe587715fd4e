"""Launch configs of the Triton kernels, kept as data: per GPU, per shape bucket, with defaults.

A table maps a device key to buckets; a bucket's key is the largest M (or head count) it serves.
Lookup order for a device: its exact name (``torch.cuda.get_device_name``), then ``sm<NN>``,
then ``default``. The ``default`` entries fit 99 KiB of shared memory per block (SM120, Ada), so
an unknown GPU still runs; ``sm90`` entries may use Hopper's 227 KiB. ``bench.kernels`` prints
the measured winners of its sweep; copy them here with the GPU name as key.
"""

from __future__ import annotations

from functools import lru_cache

import torch

Config = dict[str, int]

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"


def _small(bn: int, bk: int, warps=4, stages=3, bm=16, split=1) -> Config:
    c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return c | {"SPLIT_K": split} if split > 1 else c


def _large(bm: int, bn: int, bk: int, warps: int, stages: int) -> dict[str, Config]:
    c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    return {"gemm1": c, "gemm2": dict(c)}


# moe_small: tokens M -> per-GEMM tiles. BLOCK_M rows of one expert's (token, slot) pairs (an
# expert sees about M*K/E of them at decode, so 16 serves every bucket; more loop in chunks),
# BLOCK_N output features, BLOCK_K reduction step (a multiple of 32, one E8M0 group per 32;
# launchers halve it until it divides the reduction dim). The H100 entries are the winners of
# ``python -m pdserve.bench.kernels --sweep`` on an H100 80GB HBM3 (2026-11-22, DeepSeek-V3 shapes);
# "sm90" (the H200) reuses them untuned.
_H100_SMALL = {
    4: {"gemm1": _small(64, 256), "gemm2": _small(64, 256)},
    16: {"gemm1": _small(64, 256), "gemm2": _small(128, 128, stages=4)},
    1 << 30: {"gemm1": _small(64, 256), "gemm2": _small(128, 128)},
}
MOE_SMALL: dict[str, dict[int, dict[str, Config]]] = {
    "default": {1 << 30: {"gemm1": _small(64, 128), "gemm2": _small(128, 128)}},
    "sm90": _H100_SMALL,
    H100: _H100_SMALL,
}

# moe_small on experts in the fragment layout (``mxfp4.interleave_mxfp4``, the
# ``triton_interleaved`` backends): the weights are the MMA's left operand (wgmma, m64), so
# BLOCK_N is a multiple of 64 per warpgroup and BLOCK_K of 64. The tiles are the fastest of
# bench.kernels' SWEEP_FRAGMENT candidates on an H100 80GB HBM3 at DeepSeek-V3 shapes, M = 1,
# 16 and 128 (2026-12-06; 64 x 64 with 3-5 stages within 1-3% of each other); "sm90" (the H200)
# reuses them: on an H200 the same sweep at 16, 64 and 256 tokens (DeepSeek-V3) and 16 and 64
# (V2-Lite) found them within 2.8% of its best, about the spread of the same tiles timed twice
# there (3.3%; 2026-12-07). SPLIT_K 2 in the down projection at one token: its 896 programs
# (DeepSeek-V3) are about 1.1 waves of 6 per SM, 192 (V2-Lite) or 180 (GPT-OSS) fewer than two
# per SM; split, the whole MoE ran 3-9% faster at M = 1 on DeepSeek-V3, V2-Lite and both GPT-OSS
# sizes, on an H100 and an H200, and slower from M = 2 (bench.moe_splits, 2026-12-06,
# BENCHMARKS.md); the gate/up GEMM too where it has few programs
# (``moe_triton_small_m.FEW_PROGRAMS_PER_SM``).
# 32-row token blocks from 257 tokens, where an expert sees 8-32 (token, slot) pairs:
# 0.79-0.84x the time of 16-row blocks at M = 512 (H100, H200).
_FRAGMENT_SMALL = {
    1: {
        "gemm1": _small(64, 64, stages=4) | {"SPLIT_K_FEW": 2},  # moe_triton_small_m.split_k
        "gemm2": _small(64, 64, stages=4, split=2),
    },
    256: {"gemm1": _small(64, 64, stages=4), "gemm2": _small(64, 64, stages=4)},
    1 << 30: {"gemm1": _small(64, 64, stages=4, bm=32), "gemm2": _small(64, 64, stages=4, bm=32)},
}
MOE_SMALL_FRAGMENT: dict[str, dict[int, dict[str, Config]]] = {
    "default": {1 << 30: {"gemm1": _small(64, 128), "gemm2": _small(64, 128)}},
    "sm90": _FRAGMENT_SMALL,
    H100: _FRAGMENT_SMALL,
}

# moe_large: tokens M -> grouped-GEMM tiles, shared by both GEMMs (BLOCK_M is the alignment of
# the expert-sorted token blocks; BLOCK_N is per half, gate and up, in gemm1).
_H100_LARGE = {4096: _large(64, 64, 64, 4, 3), 1 << 30: _large(128, 64, 64, 4, 4)}
# On an H200 (bench.kernels --sweep --sweep-tables MOE_LARGE, fragment layout, 2026-12-07,
# BENCHMARKS.md "Tables for the H200"): 128 x 64 won at 4096 tokens, 128 x 128 on two
# warpgroups at 16384 (8.19 and 26.14 ms; the H100 entries ran 9.41 and 27.18 ms in a peers run
# earlier the same day, 9.19 and 30.45 ms in the sweep); at 1024 128-row blocks ran 5.36 ms
# against 64-row blocks' 3.71-3.84, so 64 x 64 stays up to 2048.
_H200_LARGE = {
    2048: _large(64, 64, 64, 4, 3),
    4096: _large(128, 64, 64, 4, 3),
    1 << 30: _large(128, 128, 64, 8, 3),
}
MOE_LARGE: dict[str, dict[int, dict[str, Config]]] = {
    "default": {1 << 30: _large(64, 64, 64, 4, 3)},
    "sm90": _H100_LARGE,
    H100: _H100_LARGE,
    H200: _H200_LARGE,
}

# mla_decode: query heads -> tiles. BLOCK_H heads share each loaded KV tile of BLOCK_N tokens;
# under 64 heads a tile of s stages holds s - 1 KV buffers, at 64 s (``mla_decode_smem``).
# Measured on an H100 (BENCHMARKS.md, "MLA decode with each tile's pages read a tile ahead"): at
# 16 heads, 1-128 sequences of 1k and 4k tokens, (16, 32, 4, 4)'s three KV buffers ran within
# 1.1% of the best of ten tiles at 11 of 14 points (1.05-1.07x behind (16, 16, 4, 4) at one
# sequence and four of 1k), and 1.05-1.14x the speed of the tiles shipped before with the kernel
# before (at 1, 8 and 64 sequences); at 128 heads (64, 64, 8, 2) ran within 6% of the best of
# eight at 8 of 12 points of 1-128 sequences of 1k-32k tokens (1.10-1.46x behind at one sequence
# of 1k and 4k, 32 and 128 of 1k).
_H100_MLA = {
    16: dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=4),
    1 << 30: dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2),
}
# The default entries fit 99 KiB of shared memory a block (SM120's): (16, 32, 4, 3)'s two KV
# buffers (93,184 B compiled for sm_90) at every head count. At 16 heads it ran ahead of
# FlashInfer's fa2 at every point above on the H100; at 128 heads it ran 1.22-1.77x the speed of
# (32, 32, 8, 2), the entry before (one KV buffer), at each of 12 points of 1-128 sequences of
# 1k-32k on an H100 and an H200 (2026-12-07, mma.sync there as on SM120), 0.44-1.23x fa2's.
# On an H200 (2026-12-07, "Tables for the H200") (16, 32, 4, 3) ran 0.92-1.19x the speed of
# (16, 32, 4, 4) over 20 points (1-128 sequences of 1k and 4k, 4-16 of 16k and 32k; geometric
# mean 1.03x; 1.11-1.19x at 8-16 of 32k and 64-128 of 4k), both ahead of fa2 at every point.
_H200_MLA = _H100_MLA | {16: dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=3)}
MLA_DECODE: dict[str, dict[int, Config]] = {
    "default": {1 << 30: dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=3)},
    "sm90": _H100_MLA,
    H100: _H100_MLA,
    H200: _H200_MLA,
}


def mla_decode_config(keys: tuple[str, ...], heads: int) -> Config:
    """The decode tiles for ``heads`` query heads under the device's ``device_keys``, most
    specific key first: the entry of the fewest heads that covers ``heads``, else the largest."""
    return pick_by_keys(MLA_DECODE, keys, heads)


# mla_prefill: one bucket per device for now (queries per block, keys per step); not swept.
MLA_PREFILL: dict[str, dict[int, Config]] = {
    "default": {1 << 30: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)},
    "sm90": {1 << 30: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)},
}

# Tokens per MoE call from which the grouped (large-M) kernel beats the small-M one, measured by
# bench.kernels at DeepSeek-V3 shapes on the fragment layout: on an H100 (2026-12-06) the small
# kernel, reading each expert once per call up to MAX_SLOTS slots, ran 2.47 / 2.93 / 3.43 ms
# against the grouped 3.51 / 3.64 / 3.73 at M = 256 / 512 / 768, the grouped 3.61 against 4.85
# at 1024 (BENCHMARKS.md): somewhere between 768 and 1024, where the small kernel's experts pass
# 32 slots (a second token block) and its time climbs; the points between were not timed
# (bench.kernels' crossover now times 832, 896 and 960), so batches of about 800-1023 tokens
# may run the slower of the two, by up to a third near 1023. The H200 takes the figure (there
# the small kernel also won at 512, 2.94 against 3.58 ms; 768 and 1024 not timed). Measured on
# the fragment layout, it serves plain-code experts too (their last measurement, 256, predates
# one launch per call). Devices not listed use the kernel set's default.
MOE_CROSSOVER_M: dict[str, int] = {H100: 1024, H200: 1024}


# linear (linear_triton.py, at most 16 rows): tiles for a plain projection ("linear") and for
# gate/up with the gated activation ("silu_mul"). BLOCK_N weight rows per program, BLOCK_K
# reduction step, SWAP 1: the weight tile is the MMA's left operand (wgmma). The H100 entries
# are one tile per kind chosen from 30 candidates, in CUDA graphs with cold weights, at
# DeepSeek-V2-Lite's, V3's and GPT-OSS's projections, 1-16 rows (2026-12-06, BENCHMARKS.md
# "Dense projections of a decode step"): the fastest at 9 of 13 shapes, 2-7% behind at the
# others (V3's q_b, o_proj, shared down; GPT-OSS's qkv). A second sweep of the same grid
# (bench.linear_tiles, 2026-12-06, bench/results/linear-tiles-H100.json) put that plain tile at
# 0.86-1.01x cuBLAS on the outputs of 4096 rows and more, where 64 x 128 tiles ran 1.03-1.27x
# its speed (V3's o_proj 92.3 -> 78.3 us, shared down 14.5 -> 11.6 us), and at 0.82-0.96x it
# below 4096 rows: "linear_wide" from WIDE_LINEAR_N output rows. In a step deepseek-v3-4l
# replayed 2.03 / 3.17 / 6.39 ms at batch 1 / 8 / 64 with them, against 2.07 / 3.28 / 6.37 ms
# with the 32 x 256 tile on another H100 the same day (not one machine; BENCHMARKS.md).
# "sm90" (the H200) reuses them: there (bench.linear_tiles, 1 and 8 rows, V2-Lite's and V3's
# projections, 2026-12-07) they ran within 7% of the best candidate at every shape, ahead of
# cuBLAS but on V3's qkv_a (0.85-0.89x) and V2-Lite's o_proj at 8 rows (0.99x). The default fits
# 99 KiB of shared memory; no GPU but Hopper runs this backend (registry), so it serves the
# interpreter's tests.
WIDE_LINEAR_N = 4096
_H100_SKINNY = {
    "linear": dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4, SWAP=1),
    "linear_wide": dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, SWAP=1),
    "silu_mul": dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4, SWAP=0),
}
SKINNY_LINEAR: dict[str, dict[str, Config]] = {
    "default": {
        "linear": dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4, SWAP=0),
        "silu_mul": dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3, SWAP=0),
    },
    "sm90": _H100_SKINNY,
    H100: _H100_SKINNY,
}


def skinny_linear_config(keys: tuple[str, ...], silu_mul: bool, n: int) -> Config:
    """The tiles of ``linear_triton`` for ``n`` output rows under the device's keys, most
    specific first: its "linear_wide" entry from WIDE_LINEAR_N rows where it has one."""
    for key in keys:
        if key in SKINNY_LINEAR:
            tiles = SKINNY_LINEAR[key]
            wide = n >= WIDE_LINEAR_N and "linear_wide" in tiles
            return tiles["silu_mul" if silu_mul else "linear_wide" if wide else "linear"]
    raise KeyError(f"no linear config for {keys}")


def skinny_linear_smem(cfg: Config, silu_mul: bool = True, elem_bytes: int = 2) -> int:
    """Shared memory a config stages: per stage the weight tiles (gate and up with silu_mul)
    and the 16-row activation tile. Triton 3.6's sm_90 compiles buffer num_stages - 1 stages
    with the weight as the MMA's right operand, num_stages with it on the left (wgmma)."""
    rows = cfg["BLOCK_N"] * (2 if silu_mul else 1) + 16
    return cfg["num_stages"] * rows * cfg["BLOCK_K"] * elem_bytes


@lru_cache(maxsize=8)
def device_keys(device: torch.device | None) -> tuple[str, ...]:
    """Keys to try for this device, most specific first; ("default",) on CPU."""
    if device is None or device.type != "cuda":
        return ("default",)
    major, minor = torch.cuda.get_device_capability(device)
    return (torch.cuda.get_device_name(device), f"sm{major}{minor}", "default")


def pick(table: dict, device: torch.device | None, size: int):
    """The entry of the first matching device key whose bucket bound is >= size."""
    return pick_by_keys(table, device_keys(device), size)


def pick_by_keys(table: dict, keys: tuple[str, ...], size: int):
    """``pick`` under the given device keys, most specific first: the smallest bucket bound >=
    size of the first key the table holds, else its largest."""
    for key in keys:
        if key in table:
            buckets = table[key]
            return buckets[min((b for b in buckets if size <= b), default=max(buckets))]
    raise KeyError(f"no config for {keys} in a table without a default")


def mla_decode_smem(cfg: Config, head_dim: int, elem_bytes: int = 2) -> int:
    """Shared memory a decode config needs: its KV tile buffers and the query tile, plus 2 KiB
    of scratch. Triton 3.6's sm_90 compiles buffer num_stages - 1 KV tiles (at least one) under
    16 and 32 heads, num_stages where 64 heads take wgmma; this matched them at D = 576 within
    2 KiB from 1 to 3 buffers (``bench.sm90_loops``)."""
    wgmma = cfg["BLOCK_H"] >= 64
    buffers = cfg["num_stages"] if wgmma else max(cfg["num_stages"] - 1, 1)
    return (buffers * cfg["BLOCK_N"] + cfg["BLOCK_H"]) * head_dim * elem_bytes + 2048


def moe_smem(cfg: Config, halves: int, elem_bytes: int = 2) -> int:
    """Shared memory a MoE GEMM config stages: per pipeline stage the packed weight tiles
    (``halves`` = 2 for gate and up) with their scales and the activation tile, plus one
    dequantized weight tile in the activation dtype for the MMA operand."""
    bn, bk, bm = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["BLOCK_M"]
    per_stage = halves * bn * (bk // 2 + bk // 32) + bk * bm * elem_bytes
    return max(cfg["num_stages"], 1) * per_stage + halves * bn * bk * elem_bytes


# GQA attention (gqa_*_triton.py): untuned first picks (timed on an H200: BENCHMARKS.md)
GQA_DECODE = dict(BLOCK_N=64, num_warps=4, num_stages=2)
GQA_PREFILL = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
GQA_HEAD_DIM = 64  # GPT-OSS's, for the shared-memory estimates


def default_smem(op: str) -> int:
    """What the default configs of an op need at most: the registry's min_smem for it."""
    d = GQA_HEAD_DIM
    if op == "gqa_decode":  # a query group padded to 16 rows, staged K and V tiles
        return (16 * d + GQA_DECODE["num_stages"] * GQA_DECODE["BLOCK_N"] * 2 * d) * 2
    if op == "gqa_prefill":
        c = GQA_PREFILL
        return (c["BLOCK_M"] * d + c["num_stages"] * c["BLOCK_N"] * 2 * d) * 2
    if op == "mla_decode":
        return max(mla_decode_smem(c, 576) for c in MLA_DECODE["default"].values())
    if op == "linear":
        tiles = SKINNY_LINEAR["default"]  # every kind it holds, plain and gated
        return max(skinny_linear_smem(c, silu_mul=kind == "silu_mul") for kind, c in tiles.items())
    if op == "mla_prefill":  # q tile + staged K and V tiles at DeepSeek's 192 / 128
        return max(
            (c["BLOCK_M"] * 192 + max(c["num_stages"], 1) * c["BLOCK_N"] * (192 + 128)) * 2
            for c in MLA_PREFILL["default"].values()
        )
    table = MOE_SMALL if op == "moe_small" else MOE_LARGE
    return max(
        moe_smem(c, 2 if name == "gemm1" else 1)
        for bucket in table["default"].values()
        for name, c in bucket.items()
    )


# FP8 block linear (fp8_gemm_triton.py): (largest M, BLOCK_M, BLOCK_N, num_warps, num_stages),
# the first row whose M bound holds; BLOCK_K is the 128 of the scale blocks. A first pick per M
# (small tiles for decode batches), not tuned on a GPU.
FP8_LINEAR_TILES = (
    (16, 16, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (None, 128, 128, 8, 3),
)


def fp8_linear_tiles(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for M tokens."""
    for bound, bm, bn, warps, stages in FP8_LINEAR_TILES:
        if bound is None or m <= bound:
            return bm, bn, warps, stages
    raise AssertionError("the last row has no bound")


def fp8_linear_smem() -> int:
    """Shared memory the FP8 linear's largest tile stages: 1-byte A and B tiles of 128 deep."""
    return max((bm + bn) * 128 * stages for _, bm, bn, _, stages in FP8_LINEAR_TILES)


# FP8 block linear through cuBLAS (fp8_gemm_scaled_mm.py): (largest N, smallest K, first M)
# rows; the first whose bounds hold gives the token count from which cuBLAS runs instead of the
# Triton kernel above. Measured on an H100 (BENCHMARKS.md, "FP8 block linear"): on V3's narrow
# projections (q_a 1536, kv_a 576 outputs) Triton's split K wins up to 256-2048 tokens; on the
# deep ones (o_proj, down_proj: K >= 16384) cuBLAS wins by 13-16% from one token; on the other
# wide ones Triton wins or ties up to 8-64 tokens (q_b by 7% at 1-8) and cuBLAS from 64 or 128.
# MLA's stacked q_a + kv_a (2112 outputs) is counted narrow; it was not measured.
SCALED_MM_FROM_M = ((2112, None, 512), (None, 16384, 1), (None, None, 64))


def scaled_mm_from_m(n: int, k: int) -> int:
    """The token count from which an FP8 linear of N outputs and K inputs runs on cuBLAS."""
    for max_n, min_k, first in SCALED_MM_FROM_M:
        if (max_n is None or n <= max_n) and (min_k is None or k >= min_k):
            return first
    raise AssertionError("the last row has no bound")
