"""GptOssForCausalLM: grouped-query attention with sinks (every other layer a sliding window),
and in every layer a MoE of MXFP4 experts with biases, routed by a softmax over each token's
top-k router logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.model.causal_lm import CausalLM, DecoderLayer
from pdserve.cluster.model.gqa_attention import GQAAttention
from pdserve.cluster.model.layers import Loadable, _copy, _empty
from pdserve.cluster.model.moe import MXFP4Experts
from pdserve.cluster.model.rope import RotaryEmbedding
from pdserve.cluster.parallel import TensorParallel
from pdserve.kernels import KernelSet, SwiGLU


class TopKRouter(Loadable):
    expected = ("weight", "bias")

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype)
        self.bias = _empty(cfg.n_routed_experts, dtype=dtype)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.expected:
            raise ValueError(f"unexpected router tensor {name!r}")
        _copy(getattr(self, name).data, tensor, name)
        self.mark_loaded(name)


class GptOssMoE(nn.Module):
    """Every rank holds its intermediate shard of all experts and returns a partial sum."""

    def __init__(
        self, cfg: ModelConfig, *, kernels: KernelSet, dtype: torch.dtype, tp: TensorParallel
    ) -> None:
        super().__init__()
        self.top_k, self.kernels = cfg.num_experts_per_tok, kernels
        self.act = SwiGLU(cfg.swiglu_alpha, cfg.swiglu_beta, cfg.swiglu_limit)
        self.router = TopKRouter(cfg, dtype)
        self.experts = MXFP4Experts(cfg, tp, dtype)
        self.prepared = None  # the experts in each MoE backend's layout, set by post_load

    def post_load(self) -> None:
        self.prepared = self.experts.prepare(self.kernels)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts: (weights [T, K] float32, summing to 1; ids [T, K])."""
        logits = F.linear(x, self.router.weight, self.router.bias)  # [T, E]
        return self.kernels.topk_softmax(logits, self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H] partial sum
        weights, ids = self.route(x)
        return self.kernels.moe(x, self.prepared, ids, weights, self.act)


class GptOssForCausalLM(CausalLM):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        max_positions: int,
        kernels: KernelSet,
        dtype: torch.dtype,
        tp: TensorParallel,
    ) -> None:
        rotary = RotaryEmbedding(
            cfg.head_dim, max_positions, cfg.rope, False, dtype, kernel=kernels.rope
        )

        def layer(i: int, rope: RotaryEmbedding) -> DecoderLayer:
            attn = GQAAttention(cfg, i, rope=rope, kernels=kernels, dtype=dtype, tp=tp)
            mlp = GptOssMoE(cfg, kernels=kernels, dtype=dtype, tp=tp)
            return DecoderLayer(cfg, attn, mlp, dtype, tp, kernels)

        super().__init__(cfg, rotary, layer, kernels=kernels, dtype=dtype, tp=tp)
