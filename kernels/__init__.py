"""Pure ops, tensors in and tensors out. Imports nothing of the project.

Every op has a PyTorch implementation (the CPU path and the test oracle) registered here; GPU
backends register themselves beside it and the registry picks per worker.
"""

import dataclasses
import importlib
import importlib.util

from pdserve.kernels import triton_configs
from pdserve.kernels.device import DeviceInfo
from pdserve.kernels.fp8_blocks import linear_dense, prepare_dense
from pdserve.kernels.kernel_set import KernelSet, PreparedMoe
from pdserve.kernels.mla_reference import mla_decode_torch, mla_prefill_torch
from pdserve.kernels.moe_reference import MoeWeights, SwiGLU, moe_mxfp4_torch
from pdserve.kernels.registry import REGISTRY, Backend, Choice, Registry
from pdserve.kernels.routing import grouped_topk

for _op in ("moe_small", "moe_large"):  # the reference reads either layout of the codes
    REGISTRY.register(
        Backend(_op, "torch", lambda: moe_mxfp4_torch, "any", priority=0, mxfp4_codes="either")
    )
REGISTRY.register(Backend("mla_decode", "torch", lambda: mla_decode_torch, "any", priority=0))
REGISTRY.register(Backend("mla_prefill", "torch", lambda: mla_prefill_torch, "any", priority=0))
REGISTRY.register(
    Backend(
        "linear_fp8",
        "torch",
        lambda: linear_dense,
        "any",
        priority=0,
        prepare=lambda: prepare_dense,
        graph_safe=True,  # a plain matmul
    )
)


def _lazy(module: str, attr: str):
    """A callable that imports pdserve.kernels.<module> on first use (nothing is compiled
    before)."""

    def get():
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    return get


for _op in ("gqa_decode", "gqa_prefill"):
    REGISTRY.register(
        Backend(_op, "torch", _lazy("gqa_reference", f"{_op}_torch"), "any", priority=0)
    )
for _op, _module, _fn in (  # elementwise kernels, reductions, top-k: capturable as they are
    ("rms_norm", "rms_norm_reference", "rms_norm_torch"),
    ("rope", "rope_reference", "rope_torch"),
    ("silu_mul", "silu_mul_reference", "silu_mul_torch"),
    ("linear", "linear_reference", "linear_torch"),
    ("mla_kv_write", "mla_kv_write_reference", "mla_kv_write_torch"),
    ("grouped_topk", "routing", "grouped_topk"),
    ("topk_softmax", "routing", "topk_softmax"),
):
    REGISTRY.register(Backend(_op, "torch", _lazy(_module, _fn), "any", graph_safe=True))


def _triton_missing() -> str | None:
    return None if importlib.util.find_spec("triton") else "triton is not installed"


def _flashinfer_missing() -> str | None:
    return _lazy("moe_flashinfer", "unavailable")()()


def _triton(op: str, module: str, fn: str, **needs) -> Backend:
    """A Triton kernel of ours: bf16 tl.dot needs sm_80+; bf16 and float32 are what the tests
    cover, on CPU and on the H100; grids and split counts come from shapes, so it may run in a
    CUDA graph (decode graphs rely on it)."""
    return Backend(
        op,
        "triton",
        _lazy(module, fn),
        "cuda",
        priority=10,
        min_sm=80,
        dtypes=("bfloat16", "float32"),
        unavailable=_triton_missing,
        graph_safe=True,
        **needs,
    )


# Attention and MoE; min_smem is what their default configs stage.
for _op, _module, _fn in (
    ("moe_small", "moe_triton_small_m", "moe_small_triton"),
    ("moe_large", "moe_triton_grouped", "moe_grouped_triton"),
    ("mla_decode", "mla_decode_triton", "mla_decode_triton"),
    ("mla_prefill", "mla_prefill_triton", "mla_prefill_triton"),
    ("gqa_decode", "gqa_decode_triton", "gqa_decode_triton"),
    ("gqa_prefill", "gqa_prefill_triton", "gqa_prefill_triton"),
):
    if not _op.startswith("moe"):
        REGISTRY.register(_triton(_op, _module, _fn, min_smem=triton_configs.default_smem(_op)))
        continue
    _backend = _triton(  # the MoE kernels read MoeWeights.interleaved
        _op, _module, _fn, min_smem=triton_configs.default_smem(_op), mxfp4_codes="either"
    )
    REGISTRY.register(_backend)
    # The same kernels on experts re-laid out at load in the MMA-fragment layout
    # (``mxfp4.interleave_mxfp4``): each lane loads its share of the wgmma A operand with one
    # 16-byte load and decodes it in registers, no shared-memory hop; its inline PTX is
    # Hopper's (bf16 on sm_90). On an H100 and an H200 it ran 1.3-1.7x the plain layout's speed
    # on DeepSeek-V3's MoE at 1-128 tokens, 1.2-1.5x at 512-16384, 1.4-3.1x on V2-Lite's and
    # GPT-OSS's (BENCHMARKS.md, "MoE kernels on the fragment layout" and "... with one multiply
    # per pair"): the default on sm_90 in bf16.
    REGISTRY.register(
        dataclasses.replace(
            _backend,
            name="triton_interleaved",
            priority=11,
            min_sm=90,
            max_sm=90,  # wgmma: on Blackwell the A operand is not read from registers
            dtypes=("bfloat16",),
            mxfp4_codes="interleaved",
        )
    )

# A decode step's dense projections: measured against cuBLAS on an H100 alone (0.98-1.28x its
# speed on plain projections at 1-8 rows, 1.24-1.58x gated against cuBLAS and two elementwise
# kernels; steps of both DeepSeek models shorter or even; BENCHMARKS.md, "Dense projections
# of a decode step"), so Hopper alone takes it (the H200 unmeasured); other GPUs keep cuBLAS.
REGISTRY.register(
    dataclasses.replace(
        _triton("linear", "linear_triton", "linear_triton"),
        min_smem=triton_configs.default_smem("linear"),
        min_sm=90,
        max_sm=90,
        dtypes=("bfloat16",),
    )
)

# One launch each for the norms, rotations and routing the torch versions spread over kernels.
# Checked against the references compiled on an H200, where they cut a decode step at batch 1 by
# a quarter (BENCHMARKS.md, "Triton glue kernels").
for _op, _module, _fn in (
    ("rms_norm", "rms_norm_triton", "rms_norm_triton"),
    ("rope", "rope_triton", "rope_triton"),
    ("silu_mul", "silu_mul_triton", "silu_mul_triton"),
    ("mla_kv_write", "mla_kv_write_triton", "mla_kv_write_triton"),
    ("grouped_topk", "routing_triton", "grouped_topk_triton"),
    ("topk_softmax", "routing_triton", "topk_softmax_triton"),
):
    REGISTRY.register(_triton(_op, _module, _fn))

# FP8 tl.dot needs sm_89+ (Ada, Hopper)
REGISTRY.register(
    Backend(
        "linear_fp8",
        "triton",
        _lazy("fp8_gemm_triton", "linear"),
        "cuda",
        priority=10,
        min_sm=89,
        min_smem=triton_configs.fp8_linear_smem(),
        dtypes=("bfloat16", "float32"),
        unavailable=_triton_missing,
        prepare=_lazy("fp8_gemm_triton", "prepare"),
        graph_safe=True,  # grids come from shapes, no host sync
    )
)

# cuBLAS's block-scaled FP8 GEMM (torch._scaled_mm with DeepSeek's recipe) exists on sm_90 alone;
# the backend runs the Triton kernel below its crossover M and on shapes cuBLAS does not take.
REGISTRY.register(
    Backend(
        "linear_fp8",
        "scaled_mm",
        _lazy("fp8_gemm_scaled_mm", "linear"),
        "cuda",
        priority=20,
        min_sm=90,
        max_sm=90,
        min_smem=triton_configs.fp8_linear_smem(),
        dtypes=("bfloat16",),
        unavailable=lambda: _triton_missing() or _lazy("fp8_gemm_scaled_mm", "unavailable")()(),
        prepare=_lazy("fp8_gemm_scaled_mm", "prepare"),
        graph_safe=True,  # cuBLAS and Triton launches from shapes, no host sync
    )
)

# FlashInfer's CUTLASS W4A16 MoE is built for sm_90a alone. Below the Triton grouped MoE: on an
# H200 it ran 2.2-2.7x slower from 1024 tokens up (BENCHMARKS.md, "MoE kernels against their
# peers"); a prefill pool takes it with the kernels override {moe_large: flashinfer_cutlass}.
REGISTRY.register(
    Backend(
        "moe_large",
        "flashinfer_cutlass",
        _lazy("moe_flashinfer", "moe_flashinfer"),
        "cuda",
        priority=5,
        min_sm=90,
        max_sm=90,
        roles=("prefill",),
        dtypes=("bfloat16",),  # W4A16: bf16 activations
        unavailable=_flashinfer_missing,
        prepare=_lazy("moe_flashinfer", "prepare"),
    )
)

# FlashInfer's MLA decode (fa3: wgmma, sm_90a alone), planned on the host per step by the model
# runner. On an H200 it ran 1.5-5x faster than the Triton kernel (../shared/peers/README.md);
# decode and colocated workers take it where FlashInfer and nvcc (its JIT build) are present.
REGISTRY.register(
    Backend(
        "mla_decode",
        "flashinfer_fa3",
        lambda: _lazy("mla_decode_flashinfer", "FlashInferMLADecode")()(),
        "cuda",
        priority=20,
        min_sm=90,
        max_sm=90,
        roles=("decode", "colocated"),
        dtypes=("bfloat16",),
        unavailable=lambda: _lazy("mla_decode_flashinfer", "unavailable")()(),
        graph_safe=True,  # its kernels read buffers the runner's plan fills before each replay
    )
)

__all__ = [
    "REGISTRY",
    "Backend",
    "Choice",
    "DeviceInfo",
    "KernelSet",
    "MoeWeights",
    "PreparedMoe",
    "Registry",
    "SwiGLU",
    "grouped_topk",
    "mla_decode_torch",
    "mla_prefill_torch",
    "moe_mxfp4_torch",
]
