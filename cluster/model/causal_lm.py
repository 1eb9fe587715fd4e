"""What every served architecture shares: embeddings, a stack of decoder layers, a final norm
and the LM head, run over a paged KV cache. Subclasses build the layers.

Module names follow the Hugging Face checkpoint's tensor names, so weight loading is a lookup.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.kv_groups import KVGroups
from pdserve.cluster.model.attention_metadata import AttentionMetadata
from pdserve.cluster.model.layers import LMHead, RMSNorm, VocabEmbedding
from pdserve.cluster.model.rope import RotaryEmbedding
from pdserve.cluster.parallel import TensorParallel
from pdserve.kernels import KernelSet


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP, each added to the residual after its all-reduce. Each add
    runs in the norm after it (one kernel): a layer returns the residual stream and its MLP's
    output, which the next layer's first norm (or the final norm) adds."""

    def __init__(
        self,
        cfg: ModelConfig,
        attn: nn.Module,
        mlp: nn.Module,
        dtype: torch.dtype,
        tp,
        kernels: KernelSet,
    ) -> None:
        super().__init__()
        self.tp = tp
        norm = dict(round_once=cfg.is_gqa, kernel=kernels.rms_norm)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, **norm)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, **norm)
        self.mlp = mlp

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden], the residual stream
        pending: torch.Tensor | None,  # [T, hidden], the previous layer's MLP output, or None
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (residual stream, this layer's MLP output)
        if pending is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm(x, pending)
        h = self.self_attn(positions, h, kv_cache, meta)
        h, x = self.post_attention_layernorm(x, self.tp.all_reduce(h))
        return x, self.tp.all_reduce(self.mlp(h))


class DecoderModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layers: list[DecoderLayer],
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        tp: TensorParallel,
        kernels: KernelSet,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, tp=tp)
        # one table for all layers; a buffer of the model, not of any layer, so it loads nothing
        self.rotary = rotary
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.is_gqa, kernel=kernels.rms_norm
        )


class CausalLM(nn.Module):
    """``make_layer(i, rope)`` builds decoder layer i; ``rope`` is the model's one table."""

    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        make_layer: Callable[[int, RotaryEmbedding], DecoderLayer],
        *,
        kernels: KernelSet,
        dtype: torch.dtype,
        tp: TensorParallel,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        layers = [make_layer(i, rotary) for i in range(cfg.num_hidden_layers)]
        self.model = DecoderModel(cfg, layers, rotary, dtype, tp, kernels)
        groups = KVGroups.of(cfg)
        self.slot_of, self.slots_done = groups.slot_of, groups.slots_done_after()
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, dtype=dtype, tp=tp)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: torch.Tensor,  # [slots, num_blocks, block_size, width] (``kv_groups``)
        meta: AttentionMetadata,
        after_layer: Callable[[int], None] | None = None,  # called with s once every layer
        # writing cache slot s is queued
    ) -> torch.Tensor:  # [T, hidden], final-normed
        x, pending = self.model.embed_tokens(input_ids), None
        for i, layer in enumerate(self.model.layers):
            x, pending = layer(positions, x, pending, kv_caches[self.slot_of[i]], meta)
            if after_layer is not None:
                for s in self.slots_done[i]:
                    after_layer(s)
        if pending is None:  # no layers
            return self.model.norm(x)
        return self.model.norm(x, pending)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32 (float64 for a float64 model)."""
        logits = self.lm_head(hidden)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def post_load(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.lm_head.mark_loaded("weight")
        for m in self.modules():  # FP8 linears, MoE experts: into their kernels' layouts
            if m is not self and hasattr(m, "post_load"):
                m.post_load()


def build(
    cfg: ModelConfig,
    *,
    max_positions: int,
    kernels: KernelSet,
    dtype: torch.dtype,
    tp: TensorParallel,
) -> CausalLM:
    """The model of ``cfg.architecture``, its weights not loaded yet."""
    if cfg.is_gqa:
        from pdserve.cluster.model.gpt_oss import GptOssForCausalLM as cls
    else:
        from pdserve.cluster.model.deepseek_v3 import DeepseekV3ForCausalLM as cls
    return cls(cfg, max_positions=max_positions, kernels=kernels, dtype=dtype, tp=tp)
