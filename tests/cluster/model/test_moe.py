"""MXFP4 experts split over tensor-parallel ranks off the 32-element blocks: each rank's
elements dequantize to what one rank holding them all would, for float checkpoints too. The
router's float32 scores, from a 16-bit weight on a GPU."""

from __future__ import annotations

import pytest
import torch

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.model.moe import MXFP4Experts, Router
from pdserve.cluster.parallel import TensorParallel
from pdserve.cluster.presets import preset_config
from pdserve.kernels.mxfp4 import dequantize_mxfp4, interleave_mxfp4


def test_unaligned_shards_of_a_float_checkpoint_keep_one_ranks_values():
    cfg = ModelConfig.from_hf({**preset_config("gpt-oss-tiny"), "vocab_size": 64,
                               "intermediate_size": 96})  # fmt: skip
    e, h, inter = cfg.n_routed_experts, cfg.hidden_size, 96
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(e, h, 2 * inter, generator=g)  # not MXFP4-representable
    down = torch.randn(e, inter, h, generator=g)

    def load(tp: TensorParallel) -> MXFP4Experts:
        m = MXFP4Experts(cfg, tp, torch.float32)
        m.load_weight("gate_up_proj", gate_up)
        m.load_weight("down_proj", down)
        return m

    whole = load(TensorParallel())
    w2 = dequantize_mxfp4(whole.w2, whole.s2)  # [E, H, 96]
    w13 = dequantize_mxfp4(whole.w13, whole.s13)  # [E, 192, H]
    for rank in range(2):
        part = load(TensorParallel(rank, 2))
        lo, own = part.lo, slice(48 * rank, 48 * (rank + 1))
        assert part.inter == 64 and lo == (0, 32)[rank]
        held = dequantize_mxfp4(part.w2, part.s2)  # [E, H, 64]: columns lo..lo + 64
        mine = torch.zeros_like(held)
        mine[:, :, own.start - lo : own.stop - lo] = w2[:, :, own]
        assert torch.equal(held, mine)  # own columns as at TP=1, others' zero
        rows = dequantize_mxfp4(part.w13, part.s13)  # [E, 128, H]: gate rows, then up rows
        for half in range(2):
            got = rows[:, half * 64 : (half + 1) * 64][:, own.start - lo : own.stop - lo]
            assert torch.equal(got, w13[:, half * inter :][:, own])


def test_codes_interleaved_at_load_give_the_same_experts():
    """``prepare`` re-lays the codes and scales out in place (the fragment layout), once, for
    backends that read that layout; the reference reads them back to the same output."""
    from pdserve.kernels import KernelSet
    from pdserve.kernels.device import H100
    from pdserve.kernels.moe_reference import SwiGLU, moe_mxfp4_torch

    cfg = ModelConfig.from_hf({**preset_config("gpt-oss-tiny"), "vocab_size": 64})
    e, h = cfg.n_routed_experts, cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    m = MXFP4Experts(cfg, TensorParallel(), torch.float32)
    m.load_weight("gate_up_proj", torch.randn(e, h, 2 * cfg.moe_intermediate_size, generator=g))
    m.load_weight("down_proj", torch.randn(e, cfg.moe_intermediate_size, h, generator=g))
    m.load_weight("gate_up_proj_bias", torch.zeros(e, 2 * cfg.moe_intermediate_size))
    x = torch.randn(3, h, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0]]) % e
    tw = torch.rand(3, 2, generator=g)
    plain_codes, plain_scales = m.w13.clone(), m.s13.clone()
    want = moe_mxfp4_torch(x, m.weights(), ids, tw, SwiGLU())
    both = {"moe_small": "triton_interleaved", "moe_large": "triton_interleaved"}
    kernels = KernelSet.resolve(H100, "decode", both)  # resolved only: no kernel runs here
    prepared = m.prepare(kernels)
    assert m.interleaved and not torch.equal(m.w13, plain_codes)
    assert prepared.small.interleaved
    assert prepared.small.small_scales  # randn weights: scale bytes 125-127
    m.interleave_codes()  # once only
    codes, scales = interleave_mxfp4(m.w13.clone(), m.s13.clone(), inverse=True)
    assert torch.equal(codes, plain_codes) and torch.equal(scales, plain_scales)
    assert torch.equal(moe_mxfp4_torch(x, m.weights(), ids, tw, SwiGLU()), want)


def test_experts_with_a_scale_past_two_take_the_two_multiply_decode():
    """A scale byte above 128 (weights past 2**2 * 6) leaves ``small_scales`` off."""
    cfg = ModelConfig.from_hf({**preset_config("gpt-oss-tiny"), "vocab_size": 64})
    e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    g = torch.Generator().manual_seed(2)
    m = MXFP4Experts(cfg, TensorParallel(), torch.float32)
    m.load_weight("gate_up_proj", torch.randn(e, h, 2 * i, generator=g) * 1000)
    m.load_weight("down_proj", torch.randn(e, i, h, generator=g))
    assert int(m.s13.max()) > 128
    m.interleave_codes()
    assert m.interleaved and not m.small_scales and not m.weights().small_scales


def test_shapes_off_the_fragment_layout_keep_plain_codes():
    """A shard whose down projection is 96 columns wide (not a multiple of 64) keeps its codes
    plain under backends that ask for the fragment layout: the Triton kernels read both."""
    from pdserve.kernels import KernelSet
    from pdserve.kernels.device import H100

    cfg = ModelConfig.from_hf({**preset_config("gpt-oss-tiny"), "vocab_size": 64,
                               "intermediate_size": 96})  # fmt: skip
    m = MXFP4Experts(cfg, TensorParallel(), torch.float32)
    g = torch.Generator().manual_seed(2)
    m.load_weight("gate_up_proj", torch.randn(cfg.n_routed_experts, 128, 192, generator=g))
    m.load_weight("down_proj", torch.randn(cfg.n_routed_experts, 96, 128, generator=g))
    plain = m.w2.clone()
    both = {"moe_small": "triton_interleaved", "moe_large": "triton_interleaved"}
    assert not m.weights().interleavable()
    prepared = m.prepare(KernelSet.resolve(H100, "decode", both))
    assert not m.interleaved and not prepared.small.interleaved and torch.equal(m.w2, plain)
    codes = m.w13.clone()
    with pytest.raises(ValueError, match="16 x 64 grid"):  # asked directly: refused, untouched
        m.interleave_codes()
    assert not m.interleaved and torch.equal(m.w13, codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("experts", [64, 512])  # 0.25 MiB / 2 MiB of 16-bit weight
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_router_scores_are_float32_products_of_the_model_dtypes_values(
    device, tokens, experts, dtype
):
    """Hidden states and weight of the model dtype: float32 scores equal to the float32 matmul
    of their values, by either path (on a GPU a 16-bit model's one matmul with float32 output,
    except for one token and a weight over 1 MiB: the float32 GEMV)."""
    cfg = ModelConfig.from_hf({**preset_config("tiny"), "vocab_size": 64,
                               "n_routed_experts": experts, "hidden_size": 2048})  # fmt: skip
    g = torch.Generator().manual_seed(0)
    w = torch.randn(experts, 2048, generator=g).to(dtype)
    x = torch.randn(tokens, 2048, generator=g).to(dtype).to(device)
    with torch.device(device):
        router = Router(cfg, dtype)
    router.load_weight("weight", w)
    router.post_load()
    assert router.weight.dtype == torch.float32
    sixteen = device == "cuda" and dtype != torch.float32
    assert (router.weight16 is not None) == sixteen
    assert router._one_matmul(x) == (sixteen and (tokens > 1 or experts == 64))
    # routing takes the scores in its own launch: 64 experts' 0.25 MiB, not 512's 2 MiB
    assert (router.fused_weight(x) is not None) == (sixteen and experts == 64)
    got = router.scores(x)
    assert got.dtype == torch.float32 and got.shape == (tokens, experts)
    want = x.double() @ w.double().to(device).T  # exact products, float64 sums
    # float32 sums of 2048 products: an error of a few float32 epsilons of the sum of |x_i w_i|
    # (tensor cores round their partial sums differently from a float32 GEMV's adds)
    bound = 8 * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().to(device).T)
    assert ((got.double() - want).abs() <= bound).all()
