"""FP8 linears: the weight and its block scales sharded together over tensor-parallel ranks,
a shard that would split a block falling back to a dequantized weight, and both backends of
``linear_fp8`` (dequantized at load; the FP8 GEMM, under Triton's interpreter here)."""

from __future__ import annotations

import pytest
import torch

from pdserve.cluster.model.layers import Linear
from pdserve.cluster.parallel import TensorParallel
from pdserve.kernels import KernelSet
from pdserve.kernels.device import H100, DeviceInfo
from pdserve.kernels.fp8_blocks import dequantize_fp8_blocks, quantize_fp8_blocks
from tests.kernels.kernel_cases import assert_fp8_gemm_close

CPU_KERNELS = KernelSet.resolve(DeviceInfo.cpu(), "decode")
# the FP8 GEMM backend runs on the GPU where there is one, else under Triton's interpreter
GEMM_DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _fp8_linear(w, s, mode, rank, size, kernels=CPU_KERNELS, bias=None) -> Linear:
    out, inp = w.shape
    tp = TensorParallel(rank=rank, size=size)
    lin = Linear(inp, out, dtype=torch.float32, tp=tp, mode=mode, bias=bias is not None,
                 fp8=((128, 128), kernels))  # fmt: skip
    lin.load_weight("weight", w)
    lin.load_weight("weight_scale_inv", s)
    if bias is not None:
        lin.load_weight("bias", bias)
    assert lin.missing_weights() == []
    lin.post_load()
    return lin


@pytest.mark.parametrize(
    "mode, size", [("column", 3), ("row", 2), ("replicated", 1), ("replicated", 2)]
)
def test_fp8_shards_carry_their_scale_blocks(mode, size):
    g = torch.Generator().manual_seed(0)
    w, s = quantize_fp8_blocks(torch.randn(384, 512, generator=g))  # scales [3, 4], all unequal
    dense = dequantize_fp8_blocks(w, s)
    x = torch.randn(5, 512, generator=g)
    full = x @ dense.T
    parts = []
    for r in range(size):
        lin = _fp8_linear(w, s, mode, r, size)
        assert lin.takes_fp8
        parts.append(lin(x if mode != "row" else x[:, r * 256 : (r + 1) * 256]))
    if mode == "replicated":  # every rank the whole product
        for part in parts:
            torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-4)
        return
    got = torch.cat(parts, dim=1) if mode == "column" else sum(parts)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-4)


def test_a_shard_that_would_split_a_block_takes_the_weight_dequantized():
    lin = Linear(256, 192, dtype=torch.float32, tp=TensorParallel(rank=1, size=2),
                 mode="column", fp8=((128, 128), CPU_KERNELS))  # fmt: skip
    assert not lin.takes_fp8 and lin.weight.dtype == torch.float32  # 96 rows per rank
    assert lin.expected == ("weight",)


def test_the_fp8_gemm_backend_runs_the_layer():
    """An H100's kernels on CPU tensors: ``linear_fp8`` is the Triton FP8 GEMM (interpreted),
    the bias added once; its result is the reference's (activations quantized)."""
    kernels = KernelSet.resolve(H100, "decode", overrides={"linear_fp8": "triton"})
    assert kernels.names()["linear_fp8"] == "triton"
    g = torch.Generator().manual_seed(1)
    w, s = quantize_fp8_blocks(torch.randn(200, 300, generator=g) * 0.1)
    bias = torch.randn(200, generator=g)
    with torch.device(GEMM_DEV):
        lin = _fp8_linear(w, s, "replicated", 0, 1, kernels, bias)
    assert lin.weight.dtype == torch.float8_e4m3fn  # kept: half of bf16's bytes
    x = torch.randn(7, 300, generator=g)
    assert_fp8_gemm_close(lin(x.to(GEMM_DEV)) - bias.to(GEMM_DEV), x, w, s)


@pytest.mark.parametrize(
    "kernels",
    [CPU_KERNELS, KernelSet.resolve(H100, "decode", overrides={"linear_fp8": "triton"})],
    ids=["dequantized", "fp8-gemm"],
)
def test_fp8_dense_mlp_stacks_gate_and_up_with_their_scales_per_rank(kernels):
    from pdserve.cluster.model.layers import DenseMLP

    g = torch.Generator().manual_seed(2)
    stored = {
        name: quantize_fp8_blocks(torch.randn(shape, generator=g) * 0.05)
        for name, shape in (("gate_proj", (512, 256)), ("up_proj", (512, 256)),
                            ("down_proj", (256, 512)))
    }  # fmt: skip
    dense = {k: dequantize_fp8_blocks(*v) for k, v in stored.items()}
    x = torch.randn(3, 256, generator=g)
    h = torch.nn.functional.silu(x @ dense["gate_proj"].T) * (x @ dense["up_proj"].T)
    want = h @ dense["down_proj"].T
    got = 0
    dev = "cpu" if kernels is CPU_KERNELS else GEMM_DEV
    for r in range(2):  # 256 intermediate rows per rank: two scale blocks each
        with torch.device(dev):
            mlp = DenseMLP(256, 512, dtype=torch.float32, tp=TensorParallel(rank=r, size=2),
                           fp8=((128, 128), kernels))  # fmt: skip
        assert mlp.fp8_names() == ("gate_proj", "up_proj") and mlp.down_proj.takes_fp8
        for name, (w, s) in stored.items():
            if name == "down_proj":
                mlp.down_proj.load_weight("weight", w)
                mlp.down_proj.load_weight("weight_scale_inv", s)
            else:
                mlp.load_weight(f"{name}.weight", w)
                mlp.load_weight(f"{name}.weight_scale_inv", s)
        assert mlp.missing_weights() == [] and mlp.down_proj.missing_weights() == []
        mlp.post_load()
        mlp.down_proj.post_load()
        got = got + mlp(x.to(dev)).cpu()
    if kernels is CPU_KERNELS:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # activations quantized to E4M3 on the way in to each GEMM: a few % of the output
        assert (got - want).norm() / want.norm() < 0.05


def test_gpt_oss_norm_rounds_as_transformers_does_in_bf16():
    """GptOssRMSNorm scales in float32 and rounds once; DeepSeek's rounds, then scales."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    from pdserve.cluster.model.layers import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2880, generator=g).bfloat16()
    ref = GptOssRMSNorm(2880, eps=1e-5).bfloat16()
    ref.weight.data = (1 + 0.1 * torch.randn(2880, generator=g)).bfloat16()
    ours = RMSNorm(2880, 1e-5, torch.bfloat16, round_once=True)
    ours.weight.data = ref.weight.data.clone()
    assert torch.equal(ours(x), ref(x))
