"""DeepseekV3ForCausalLM: MLA attention, dense MLP in the first layers, MoE after."""

from __future__ import annotations

import torch

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.model.attention import MLAAttention
from pdserve.cluster.model.causal_lm import CausalLM, DecoderLayer
from pdserve.cluster.model.layers import DenseMLP
from pdserve.cluster.model.moe import MoEBlock
from pdserve.cluster.model.rope import RotaryEmbedding
from pdserve.cluster.parallel import TensorParallel
from pdserve.kernels import KernelSet


class DeepseekV3ForCausalLM(CausalLM):
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
            cfg.qk_rope_head_dim,
            max_positions,
            cfg.rope,
            cfg.rope_interleave,
            dtype,
            kernel=kernels.rope,
        )
        fp8 = (cfg.fp8_block, kernels) if cfg.fp8_block else None

        def layer(i: int, rope: RotaryEmbedding) -> DecoderLayer:
            attn = MLAAttention(cfg, rope=rope, kernels=kernels, dtype=dtype, tp=tp)
            if cfg.is_moe_layer(i):
                mlp: torch.nn.Module = MoEBlock(cfg, kernels=kernels, dtype=dtype, tp=tp)
            else:
                mlp = DenseMLP(
                    cfg.hidden_size, cfg.intermediate_size, dtype=dtype, tp=tp, fp8=fp8,
                    act=kernels.silu_mul, linear=kernels.linear,
                )  # fmt: skip
            return DecoderLayer(cfg, attn, mlp, dtype, tp, kernels)

        super().__init__(cfg, rotary, layer, kernels=kernels, dtype=dtype, tp=tp)
