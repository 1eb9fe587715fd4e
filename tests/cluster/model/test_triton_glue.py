"""The model with the Triton norm, rope, MLA cache-write, gate/up-with-activation and routing
kernels (interpreted on CPU, compiled on a GPU) in place of the PyTorch ones: the same greedy
tokens, for a DeepSeek-V3-style model (MLA: strided latent rows and rope columns, grouped
top-k) and for GPT-OSS (split-half rope, GPT-OSS's norm, top-k softmax), with the residual adds
fused into the norms in both.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams
from pdserve.cluster.model.attention import MLAAttention
from pdserve.cluster.model.gpt_oss import GptOssMoE
from pdserve.cluster.model.layers import DenseMLP, Linear, RMSNorm
from pdserve.cluster.model.rope import RotaryEmbedding
from pdserve.cluster.model.stacked_linear import StackedLinear
from pdserve.kernels.linear_triton import linear_triton
from pdserve.kernels.mla_kv_write_triton import mla_kv_write_triton
from pdserve.kernels.rms_norm_triton import rms_norm_triton
from pdserve.kernels.rope_triton import rope_triton
from pdserve.kernels.routing_triton import grouped_topk_triton, topk_softmax_triton
from pdserve.kernels.silu_mul_triton import silu_mul_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled there, else interpreted


def _engine(model: str) -> LLMEngine:
    cache = CacheConfig(block_size=16, num_blocks=64)
    return LLMEngine(EngineConfig(model=model, device=DEVICE, dtype="float32", cache=cache))


def _swap_in_triton(engine: LLMEngine) -> int:
    """Every norm, rotation, router and dense projection of the engine's model through the
    Triton kernels (float32 here: the projections run the kernel where it is interpreted, on a
    GPU they go to cuBLAS)."""
    swapped = 0
    for m in engine.runner.model.modules():
        if isinstance(m, RMSNorm):
            m.kernel, swapped = rms_norm_triton, swapped + 1
        elif isinstance(m, RotaryEmbedding):
            m.kernel, swapped = rope_triton, swapped + 1
        elif hasattr(m, "kernels") and hasattr(m, "gate"):  # DeepSeek's MoE block
            m.kernels = dataclasses.replace(m.kernels, grouped_topk=grouped_topk_triton)
            swapped += 1
        elif isinstance(m, GptOssMoE):  # GPT-OSS's router
            m.kernels = dataclasses.replace(m.kernels, topk_softmax=topk_softmax_triton)
            swapped += 1
        elif isinstance(m, MLAAttention):  # its rotations, latent norm and cache write
            m.kernels = dataclasses.replace(m.kernels, mla_kv_write=mla_kv_write_triton)
            swapped += 1
        elif isinstance(m, DenseMLP):  # dense layers and shared experts: silu in the epilogue
            m.act, m.linear, swapped = silu_mul_triton, linear_triton, swapped + 1
        if isinstance(m, (Linear, StackedLinear)):  # every dense projection
            m.linear, swapped = linear_triton, swapped + 1
    return swapped


@pytest.mark.parametrize("which", ["tiny_model", "gpt_oss_model"])
def test_triton_glue_gives_the_same_greedy_tokens(which, request):
    model = request.getfixturevalue(which)
    prompts = [[5, 9, 13, 2, 7, 11, 3], [4] * 20 + [8, 6]]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in _engine(model).generate(prompts, sp)]
    engine = _engine(model)
    assert _swap_in_triton(engine) > 3
    with torch.no_grad():
        got = [o.token_ids for o in engine.generate(prompts, sp)]
    assert got == want
