"""moe_small, Triton: against moe_mxfp4_torch (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.kernels import moe_triton_small_m, triton_configs
from pdserve.kernels.moe_reference import SwiGLU, moe_mxfp4_torch
from pdserve.kernels.moe_triton_common import fit_block_k
from pdserve.kernels.moe_triton_small_m import moe_small_triton
from tests.kernels.kernel_cases import (
    GPT_OSS_ACT,
    REAL_MOE_SHAPES,
    nan_like,
    poison_cuda_allocator,
    random_moe,
    random_routing,
    rel_err,
)


def tiles(bm=16, bn=16, bk=32, swap=0):
    c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=1, SWAP=swap)
    return {"gemm1": c, "gemm2": c}


def check(
    device, m, dtype, act, bias, *, e=8, h=64, i=32, k=3, invalid=False, cfg=None, tol=None,
    interleaved=False,
):  # fmt: skip
    w = random_moe(e, h, i, bias=bias, dtype=dtype, device=device, seed=m)
    ids, tw = random_routing(m, e, k, device=device, seed=m + 1, invalid=invalid)
    x = torch.randn(m, h, device=device).to(dtype)
    ref = moe_mxfp4_torch(x, w, ids, tw, act)  # plain codes
    if interleaved:  # "two_mul": the decode with two multiplies, as for scales past 128
        w = w.interleaved_copy()
        w = dataclasses.replace(w, small_scales=False) if interleaved == "two_mul" else w
    out = moe_small_triton(x, w, ids, tw, act, config=cfg, out=nan_like((m, h), dtype, device))
    # float32 runs the same float math as the reference; bf16 rounds intermediates in other spots
    assert rel_err(out, ref) < (tol or (1e-5 if dtype == torch.float32 else 2e-2))
    return out


@pytest.mark.parametrize(
    "m, dtype, act, bias",
    [
        (1, torch.float32, SwiGLU(), False),
        (5, torch.float32, GPT_OSS_ACT, True),
        (7, torch.bfloat16, SwiGLU(), True),
        (3, torch.bfloat16, GPT_OSS_ACT, False),
        (2, torch.float16, SwiGLU(alpha=1.3, beta=0.5), False),
    ],
)
def test_matches_reference(device, m, dtype, act, bias):
    check(device, m, dtype, act, bias)


def test_invalid_expert_ids_contribute_nothing(device):
    out = check(device, 6, torch.float32, SwiGLU(), True, invalid=True)
    # a token whose every id is invalid gets exactly zero
    w = random_moe(8, 64, 32, bias=True, dtype=torch.float32, device=device)
    x = torch.randn(2, 64, device=device)
    ids = torch.tensor([[-1, 8], [3, -5]], device=device)
    tw = torch.ones(2, 2, device=device)
    got = moe_small_triton(x, w, ids, tw, SwiGLU())
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert rel_err(got, moe_mxfp4_torch(x, w, ids, tw, SwiGLU())) < 1e-5
    assert out.shape == (6, 64)


def test_repeated_expert_in_one_token(device):
    w = random_moe(4, 64, 32, device=device, dtype=torch.float32)
    x = torch.randn(3, 64, device=device)
    ids = torch.tensor([[1, 1], [2, 1], [0, 0]], device=device)
    tw = torch.rand(3, 2, device=device)
    out = moe_small_triton(x, w, ids, tw, SwiGLU())
    assert rel_err(out, moe_mxfp4_torch(x, w, ids, tw, SwiGLU())) < 1e-5


def test_many_tiles_k_steps_and_row_chunks(device):
    # two experts and 20 tokens: 20 slots per expert > BLOCK_M=16 (two row chunks); H=96 is not a
    # multiple of BLOCK_K=64: gemm1 takes one whole K tile and a masked one of 32; I=64 in one
    # step; several N tiles
    check(device, 20, torch.float32, GPT_OSS_ACT, True, e=2, h=96, i=64, k=2, cfg=tiles(16, 16, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_operands_match_the_reference(device, dtype):
    # the weights as the MMA's left operand: several N tiles, row chunks (20 slots > BLOCK_M),
    # a masked K tail (H=96 with BLOCK_K=64), biases and GPT-OSS's clamp
    check(device, 20, dtype, GPT_OSS_ACT, True, e=2, h=96, i=64, k=2, cfg=tiles(16, 32, 64, 1))
    check(device, 3, dtype, SwiGLU(), False, h=256, i=128, cfg=tiles(16, 64, 128, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interleaved_codes_give_the_plain_codes_result(device, dtype):
    # the fragment layout in both GEMMs: several N and K tiles, a masked K tail (H=192,
    # BLOCK_K=128), several 16-row stripes per tile, biases; bf16 on CUDA takes the inline PTX
    cfg = tiles(16, 32, 128)
    check(device, 5, dtype, GPT_OSS_ACT, True, h=192, i=64, cfg=cfg, interleaved=True)
    check(device, 3, dtype, SwiGLU(), False, h=256, i=128, cfg=tiles(16, 64, 64), interleaved=True)
    check(device, 4, dtype, SwiGLU(), True, h=128, i=64, cfg=cfg, interleaved="two_mul")


def test_k_tiles_past_the_reduction_dim_are_masked(device):
    # GPT-OSS's 2880 = 11 * 256 + 64 in miniature: H=352 is one 256 tile and a masked tail of 96;
    # I=160 is a masked tile alone (BLOCK_K 256 > I); bf16, biases, every scale group in play
    check(device, 3, torch.float32, GPT_OSS_ACT, True, h=352, i=160, cfg=tiles(16, 32, 256))
    check(device, 4, torch.bfloat16, GPT_OSS_ACT, True, h=352, i=160, cfg=tiles(16, 32, 256))


def split_tiles(split1, split2, bn=16, bk=32):
    c = tiles(16, bn, bk)["gemm1"]
    return {"gemm1": dict(c, SPLIT_K=split1), "gemm2": dict(c, SPLIT_K=split2)}


@pytest.mark.parametrize(
    "split1, split2, interleaved", [(2, 1, False), (1, 3, False), (4, 2, False), (3, 4, True)]
)
def test_split_k_matches_one_split(device, split1, split2, interleaved):
    """Both GEMMs with the reduction split over programs: H=160 in tiles of BLOCK_K 64 is two
    whole tiles and a partial one, so one split holds the tail, and with 4 splits one holds
    nothing; I=96 likewise (the fragment layout: H=192, I=128, whole tiles, two splits of
    four empty); biases, GPT-OSS's clamp, invalid ids, row chunks (20 slots on two experts >
    BLOCK_M). The same sums in another order: within float32 rounding of one split's result."""
    bk = 64
    for m, e, k, dtype, act, bias in (
        (5, 8, 3, torch.float32, GPT_OSS_ACT, True),
        (20, 2, 2, torch.float32, SwiGLU(), False),
        (3, 8, 3, torch.bfloat16, SwiGLU(alpha=1.3, beta=0.5), True),
    ):
        split = split_tiles(split1, split2, 32 if interleaved else 16, bk)
        one = split_tiles(1, 1, 32 if interleaved else 16, bk)
        torch.manual_seed(m)  # the same activations for both runs
        got = check(device, m, dtype, act, bias, e=e, h=192 if interleaved else 160,
                    i=128 if interleaved else 96, k=k, invalid=m == 5, cfg=split,
                    interleaved=interleaved)  # fmt: skip
        torch.manual_seed(m)
        base = check(device, m, dtype, act, bias, e=e, h=192 if interleaved else 160,
                     i=128 if interleaved else 96, k=k, invalid=m == 5, cfg=one,
                     interleaved=interleaved)  # fmt: skip
        assert rel_err(got, base) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("ahead, interleaved", [(1, True), (2, True), (2, False)])
def test_tiles_loaded_ahead_match_the_pipelined_loop(device, ahead, interleaved):
    """AHEAD (``moe_k_loops``): the K loops carry the next tiles as loaded instead of Triton's
    pipeline. H=320 in BLOCK_K 64 is five whole tiles (loads past the loop's end masked off),
    split over 2 programs, I=192 over 4 (one empty), row chunks (20 slots on two experts);
    then one split with a partial last tile after the loop (plain codes: H=352 and I=96 in
    BLOCK_K 64; the fragment layout: H=320 and I=192 in BLOCK_K 128), biases, invalid ids.
    The same sums in the same order as AHEAD 0's."""
    for m, e, k, h, i, split1, split2, bk in (
        (20, 2, 2, 320, 192, 2, 4, 64),
        (3, 4, 2, 320 if interleaved else 352, 192 if interleaved else 96, 1, 1,
         128 if interleaved else 64),
    ):  # fmt: skip
        base = split_tiles(split1, split2, 32 if interleaved else 16, bk)
        outs = []
        for cfg in ({name: dict(c, AHEAD=ahead) for name, c in base.items()}, base):
            torch.manual_seed(m)  # the same activations for both runs
            outs.append(check(device, m, torch.float32, GPT_OSS_ACT, True, e=e, h=h, i=i, k=k,
                              invalid=m == 3, cfg=cfg, interleaved=interleaved))  # fmt: skip
        assert torch.equal(outs[0], outs[1])


def test_several_scale_groups_per_tile(device):
    # BLOCK_K 128 and 256: four and eight E8M0 groups per dequantized tile, in both GEMMs
    check(device, 5, torch.bfloat16, SwiGLU(), True, h=256, i=128, cfg=tiles(16, 32, 128))
    check(device, 3, torch.bfloat16, GPT_OSS_ACT, False, h=256, i=256, cfg=tiles(16, 64, 256))


def test_block_k_fits_the_reduction_dim():
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3)
    assert fit_block_k(cfg, 7168)["BLOCK_K"] == 256
    assert fit_block_k(cfg, 2880)["BLOCK_K"] == 64  # GPT-OSS: 2880 = 45 * 64
    assert fit_block_k(cfg, 1408)["BLOCK_K"] == 128  # DeepSeek-V2-Lite intermediate
    assert fit_block_k(cfg, 96)["BLOCK_K"] == 32 and cfg["BLOCK_K"] == 256


def test_token_chunks_when_slots_exceed_one_launch(device, monkeypatch):
    monkeypatch.setattr(moe_triton_small_m, "MAX_SLOTS", 8)  # 9 tokens x 3 slots -> 4 launches
    check(device, 9, torch.float32, SwiGLU(), False, invalid=True)


def test_empty_batch_and_bad_inputs(device):
    w = random_moe(4, 64, 32, device=device)
    x = torch.randn(0, 64, device=device).bfloat16()
    ids = torch.zeros(0, 2, dtype=torch.long, device=device)
    assert moe_small_triton(x, w, ids, torch.zeros(0, 2, device=device), SwiGLU()).shape == (0, 64)
    x = torch.randn(2, 32, device=device).bfloat16()
    with pytest.raises(ValueError, match="hidden 32"):
        moe_small_triton(x, w, ids[:0].new_zeros(2, 2), torch.zeros(2, 2, device=device), SwiGLU())
    x = torch.randn(2, 64, device=device).bfloat16()
    with pytest.raises(ValueError, match="topk_ids dtype"):
        moe_small_triton(x, w, torch.zeros(2, 2, device=device), torch.zeros(2, 2), SwiGLU())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", REAL_MOE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("swap, interleaved", [(0, False), (1, False), (1, True)])
def test_real_shapes_gpu(shape, m, swap, interleaved):
    dev = torch.device("cuda")
    w = random_moe(shape.experts, shape.hidden, shape.inter, bias=shape.bias, device=dev, seed=m)
    ids, tw = random_routing(m, shape.experts, shape.top_k, device=dev, seed=m, invalid=True)
    x = torch.randn(m, shape.hidden, device=dev).bfloat16()
    cfg = triton_configs.pick(triton_configs.MOE_SMALL, dev, m)
    cfg = {name: dict(c, SWAP=swap) for name, c in cfg.items()}
    ref = moe_mxfp4_torch(x, w, ids, tw, shape.act)
    w = w.interleaved_copy() if interleaved else w
    poison_cuda_allocator()
    out = moe_small_triton(
        x, w, ids, tw, shape.act, config=cfg, out=nan_like(x.shape, x.dtype, dev)
    )
    assert rel_err(out, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("shape", REAL_MOE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("ahead", [1, 2])
def test_real_shapes_tiles_loaded_ahead_gpu(shape, m, ahead):
    """The fragment layout's tuned tiles (split at one token) with their tiles loaded AHEAD
    into registers (``moe_k_loops``), on every real shape, against the reference."""
    ahead_tiles = dict(AHEAD=ahead, num_stages=1)
    check_real_fragment_gpu(shape, m, ahead_tiles, ahead_tiles)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", REAL_MOE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("m", [7, 64])
def test_real_shapes_registers_capped_gpu(shape, m):
    """The tuned tiles with their registers capped (a config's ``maxnreg``: gate/up at 80, down
    at 64, as bench.kernels' candidates), on every real shape, against the reference."""
    check_real_fragment_gpu(shape, m, dict(maxnreg=80), dict(maxnreg=64))


def test_split_down_projection_ignores_invalid_slots_weights(device):
    """Split or not, a slot of an invalid expert id adds nothing, whatever its routing weight
    (NaN, inf) holds."""
    w = random_moe(4, 64, 32, bias=True, device=device, dtype=torch.float32)
    x = torch.randn(2, 64, device=device)
    ids = torch.tensor([[-1, 2], [3, 4]], device=device)
    tw = torch.tensor([[float("nan"), 0.5], [0.25, float("inf")]], device=device)
    finite = torch.where((ids >= 0) & (ids < 4), tw, 0.0)
    ref = moe_mxfp4_torch(x, w, ids, finite, SwiGLU())
    for split in (1, 2):
        out = moe_small_triton(x, w, ids, tw, SwiGLU(), config=split_tiles(1, split))
        assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-5, split


def test_split_count_for_few_programs():
    split_k = moe_triton_small_m.split_k
    few = {"SPLIT_K_FEW": 2}
    assert split_k(few, 132, 132) == 2 and split_k(few, 180, 132) == 2  # V2-Lite, GPT-OSS
    assert split_k(few, 256, 132) == 1 and split_k({}, 10, 132) == 1  # V3; none named
    assert split_k({"SPLIT_K": 2}, 896, 132) == 2 and split_k(few | {"SPLIT_K": 3}, 199, 132) == 3


def test_gate_up_split_where_its_programs_are_few(device, monkeypatch):
    """One token, two experts, I = 32 in 16-row tiles: 4 gate/up programs, under 1.5 per SM
    on the 4 "SMs" the CPU counts, so SPLIT_K_FEW applies (the kernel launched with 3 splits:
    2 whole K tiles of 32 and an empty split); the 8 down programs do not."""
    launched = []
    real = moe_triton_small_m._launch

    def spy(cfg, kernel, grid, *args, **consts):
        launched.append(grid)
        return real(cfg, kernel, grid, *args, **consts)

    monkeypatch.setattr(moe_triton_small_m, "_launch", spy)
    monkeypatch.setattr(moe_triton_small_m, "sm_count", lambda dev: 4)
    c = tiles(16, 16, 32)["gemm1"]
    cfg = {"gemm1": c | {"SPLIT_K_FEW": 3}, "gemm2": c | {"SPLIT_K_FEW": 3}}
    check(device, 1, torch.float32, GPT_OSS_ACT, True, e=8, h=64, i=32, k=2, cfg=cfg)
    assert launched == [(2, 2, 3), (2, 4, 1)]  # (experts, N tiles, splits): gate/up, down


@pytest.mark.gpu
@pytest.mark.parametrize("shape", REAL_MOE_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("m, split1, split2", [(1, 4, 2), (7, 2, 4), (16, 8, 8)])
def test_real_shapes_split_k_gpu(shape, m, split1, split2):
    """The fragment layout's tuned tiles with the reduction split over programs, on every
    real shape (GPT-OSS's 2880 = 45 tiles of 64 splits unevenly), against the reference."""
    check_real_fragment_gpu(shape, m, dict(SPLIT_K=split1), dict(SPLIT_K=split2))


def check_real_fragment_gpu(shape, m: int, gemm1: dict, gemm2: dict) -> None:
    """moe_small on experts in the fragment layout at a real shape and M tokens (invalid ids
    among them), the tuned tiles changed by ``gemm1`` and ``gemm2``, against the reference."""
    dev = torch.device("cuda")
    w = random_moe(shape.experts, shape.hidden, shape.inter, bias=shape.bias, device=dev, seed=m)
    ids, tw = random_routing(m, shape.experts, shape.top_k, device=dev, seed=m, invalid=True)
    x = torch.randn(m, shape.hidden, device=dev).bfloat16()
    cfg = triton_configs.pick(triton_configs.MOE_SMALL_FRAGMENT, dev, m)
    cfg = {"gemm1": dict(cfg["gemm1"], **gemm1), "gemm2": dict(cfg["gemm2"], **gemm2)}
    ref = moe_mxfp4_torch(x, w, ids, tw, shape.act)
    w = w.interleaved_copy()
    poison_cuda_allocator()
    out = moe_small_triton(
        x, w, ids, tw, shape.act, config=cfg, out=nan_like(x.shape, x.dtype, dev)
    )
    assert rel_err(out, ref) < 2e-2


@pytest.mark.gpu
def test_one_launch_of_thousands_of_slots_gpu():
    """1000 tokens at top-8 over 256 experts: 8000 slots grouped by one program (its sort and
    histogram at BLOCK_S 8192), in one launch, 32-row token blocks; fragment layout."""
    dev = torch.device("cuda")
    w = random_moe(256, 128, 64, device=dev, seed=3)
    ids, tw = random_routing(1000, 256, 8, device=dev, seed=4, invalid=True)
    x = torch.randn(1000, 128, device=dev).bfloat16()
    ref = moe_mxfp4_torch(x, w, ids, tw, SwiGLU())
    cfg = triton_configs.pick(triton_configs.MOE_SMALL_FRAGMENT, dev, 1000)
    assert cfg["gemm1"]["BLOCK_M"] == 32 and 1000 * 8 <= moe_triton_small_m.MAX_SLOTS
    w = w.interleaved_copy()
    poison_cuda_allocator()
    out = moe_small_triton(x, w, ids, tw, SwiGLU(), out=nan_like(x.shape, x.dtype, dev))
    assert rel_err(out, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("split1, split2", [(2, 3), (4, 2)])
def test_split_k_with_a_k_tail_gpu(split1, split2):
    """The fragment layout compiled with split reductions whose last tile is partial: H = 320
    and I = 192 in BLOCK_K 128 (two whole tiles and a half, one and a half; splits past them
    empty)."""
    dev = torch.device("cuda")
    c = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    cfg = {"gemm1": c | {"SPLIT_K": split1}, "gemm2": c | {"SPLIT_K": split2}}
    for m in (1, 6):
        check(dev, m, torch.bfloat16, GPT_OSS_ACT, True, h=320, i=192, k=3, cfg=cfg,
              invalid=True, interleaved=True)  # fmt: skip


@pytest.mark.gpu
def test_cuda_graph_replay_gpu():
    dev = torch.device("cuda")
    shape = REAL_MOE_SHAPES[1]
    w = random_moe(shape.experts, shape.hidden, shape.inter, device=dev)
    ids, tw = random_routing(4, shape.experts, shape.top_k, device=dev, seed=1)
    x = torch.randn(4, shape.hidden, device=dev).bfloat16()
    moe_small_triton(x, w, ids, tw, shape.act)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_small_triton(x, w, ids, tw, shape.act)
    for seed in (2, 3):  # new routing and activations in the same buffers, then replay
        new_ids, new_tw = random_routing(4, shape.experts, shape.top_k, device=dev, seed=seed)
        ids.copy_(new_ids)
        tw.copy_(new_tw)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert rel_err(out, moe_mxfp4_torch(x, w, ids, tw, shape.act)) < 2e-2
