"""DeepseekV3ForCausalLM: MLA attention, dense MLP in the first layers, MoE after.

Module names follow the Hugging Face checkpoint's tensor names, so weight loading is a lookup.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.model.attention import MLAAttention
from pdserve.cluster.model.attention_metadata import AttentionMetadata
from pdserve.cluster.model.layers import DenseMLP, Linear, LMHead, RMSNorm, VocabEmbedding
from pdserve.cluster.model.moe import MoEBlock
from pdserve.cluster.model.rope import RotaryEmbedding
from pdserve.cluster.parallel import TensorParallel
from pdserve.kernels import KernelSet


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        *,
        rope: RotaryEmbedding,
        kernels: KernelSet,
        dtype: torch.dtype,
        tp: TensorParallel,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLAAttention(cfg, rope=rope, kernels=kernels, dtype=dtype, tp=tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.is_moe_layer(layer):
            self.mlp: nn.Module = MoEBlock(cfg, kernels=kernels, dtype=dtype, tp=tp)
        else:
            fp8 = (cfg.fp8_block, kernels) if cfg.fp8_block else None
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, tp=tp, fp8=fp8)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = self.self_attn(positions, self.input_layernorm(x), kv_cache, meta)
        x = x + self.tp.all_reduce(h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + self.tp.all_reduce(h)


class DeepseekV3Model(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        max_positions: int,
        kernels: KernelSet,
        dtype: torch.dtype,
        tp: TensorParallel,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, tp=tp)
        # one table for all layers; a buffer of the model, not of any layer, so it loads nothing
        self.rotary = RotaryEmbedding(
            cfg.qk_rope_head_dim, max_positions, cfg.rope, cfg.rope_interleave, dtype
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, rope=self.rotary, kernels=kernels, dtype=dtype, tp=tp)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        max_positions: int,
        kernels: KernelSet,
        dtype: torch.dtype,
        tp: TensorParallel,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DeepseekV3Model(
            cfg, max_positions=max_positions, kernels=kernels, dtype=dtype, tp=tp
        )
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, dtype=dtype, tp=tp)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: torch.Tensor,  # [L, num_blocks, block_size, r + rope]
        meta: AttentionMetadata,
        after_layer: Callable[[int], None] | None = None,  # called with i once layer i is queued
    ) -> torch.Tensor:  # [T, hidden], final-normed
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(positions, x, kv_caches[i], meta)
            if after_layer is not None:
                after_layer(i)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32 (float64 for a float64 model)."""
        logits = self.lm_head(hidden)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def post_load(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.lm_head.mark_loaded("weight")
        for m in self.modules():
            if isinstance(m, (MoEBlock, Linear, DenseMLP)):
                m.post_load()
