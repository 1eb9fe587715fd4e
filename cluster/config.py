"""Configs every process agrees on: frozen dataclasses, resolved once, never mutated."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "GptOssForCausalLM")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the rope part of q and k; plain or YaRN-scaled."""

    theta: float = 10000.0
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0  # YaRN context-extension factor
    original_max_position_embeddings: int = 4096  # pretraining context of a YaRN model
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None  # DeepSeek: also scales the softmax by mscale(factor)**2
    attention_factor: float | None = None  # multiplies cos/sin; derived from mscale when None
    truncate: bool = True  # round the YaRN correction range to whole dims

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> RopeConfig:
        """Read either the published style (``rope_theta`` + ``rope_scaling``) or the one
        transformers >= 5 writes (``rope_parameters``)."""
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, yarn")
        max_pos = int(cfg.get("max_position_embeddings", 4096))
        if rope_type == "default":
            return RopeConfig(theta=float(theta))
        orig = int(params.get("original_max_position_embeddings") or max_pos)
        factor = params.get("factor")
        return RopeConfig(
            theta=float(theta),
            rope_type="yarn",
            factor=float(factor) if factor is not None else max_pos / orig,
            original_max_position_embeddings=orig,
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    """A model's dimensions, read from a checkpoint's config.json: the DeepSeek-V3 architecture
    (MLA attention, sigmoid group-limited routing, shared experts), or GPT-OSS (grouped-query
    attention with sinks and sliding-window layers, softmax top-k routing, expert biases), whose
    fields the DeepSeek ones map onto (``hf_config``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int  # each routed and shared expert
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None  # None: q is one projection (DeepSeek-V2-Lite)
    kv_lora_rank: int  # latent width, cached
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # rope width, cached once per token (shared by all heads)
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int  # layers before this index use a dense MLP
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    rope_interleave: bool  # rope dims come in (even, odd) pairs, as DeepSeek's weights have them
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # "" (bf16/fp32 weights), "mxfp4" (experts stored as MXFP4 *_blocks/*_scales, GPT-OSS
    # layout) or "fp8" (DeepSeek's release format: linears in E4M3 with block scales)
    quant_method: str = ""
    fp8_block: tuple[int, int] | None = None  # fp8: the scales' block shape [out, in]
    checkpoint_dtype: str = "bfloat16"
    architecture: str = "DeepseekV3ForCausalLM"
    # grouped-query attention (GPT-OSS); qk_rope_head_dim and v_head_dim equal head_dim there
    num_key_value_heads: int = 0
    head_dim: int = 0
    sliding_window: int = 0  # tokens a sliding layer's query sees, itself included
    layer_types: tuple[str, ...] = ()  # "sliding_attention" or "full_attention" per layer
    # the experts' gated activation (kernels.SwiGLU): plain SiLU gating unless set
    swiglu_alpha: float = 1.0
    swiglu_beta: float = 0.0
    swiglu_limit: float | None = None

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> ModelConfig:
        """Read a checkpoint's config.json dict (``hf_config``); ValueError naming anything
        unsupported."""
        from pdserve.cluster.hf_config import model_config

        return model_config(cfg)

    @staticmethod
    def from_dir(path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"no config.json in model directory {str(path)!r}")
        cfg = json.loads(config_file.read_text())
        # generation_config.json's end tokens count too (GPT-OSS lists <|call|> and
        # <|endoftext|> there, beside config.json's <|return|>)
        gen_file = Path(path) / "generation_config.json"
        if gen_file.is_file():
            from pdserve.cluster.hf_config import eos_ids

            ids = eos_ids(cfg) + eos_ids(json.loads(gen_file.read_text()))
            cfg["eos_token_id"] = list(dict.fromkeys(ids)) or None
        return ModelConfig.from_hf(cfg)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_gqa(self) -> bool:
        """Grouped-query attention with a K/V cache (GPT-OSS), not MLA's latent cache."""
        return self.num_key_value_heads > 0

    @property
    def kv_cache_dim(self) -> int:
        """Width of one cached token. MLA: the normalized latent, then the rotated rope key.
        GQA: per KV head, its rotated key then its value (every KV head on every
        tensor-parallel rank, so any rank's cache is whole, as MLA's is)."""
        if self.is_gqa:
            return 2 * self.num_key_value_heads * self.head_dim
        return self.kv_lora_rank + self.qk_rope_head_dim

    def window(self, layer: int) -> int:
        """Tokens layer ``layer``'s queries see (themselves included); 0: all."""
        sliding = self.layer_types and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else 0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt of the unabsorbed q.k width, times YaRN's mscale(factor)**2 when configured
        (DeepSeek); GPT-OSS: 1/sqrt(head_dim)."""
        if self.is_gqa:
            return self.head_dim**-0.5
        scale = self.qk_head_dim**-0.5
        if self.rope.rope_type != "default" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.num_hidden_layers * self.kv_cache_dim * torch.finfo(dtype).bits // 8


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache. Both sides of a KV transfer must agree on all of it."""

    block_size: int = 64  # tokens per block; FlashMLA's page size
    num_blocks: int | None = None  # fixed count; None sizes the cache from memory
    gpu_memory_fraction: float = 0.9  # of free GPU memory after weights, for the KV cache
    cpu_kv_bytes: int = 1 << 30  # KV cache size on CPU
    prefix_caching: bool = True  # keep full blocks' KV after a request, reuse it by content


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits of one engine."""

    max_num_seqs: int = 256  # running requests at once
    max_num_batched_tokens: int = 8192  # tokens per forward pass: decodes + prefill chunks
    max_model_len: int | None = None  # prompt + output; None takes the model's max positions
    long_prefill_token_threshold: int = 0  # >0: cap one request's chunk so prompts share a step
    max_waiting: int = 0  # queued requests beyond the running batch before "overloaded"; 0: 4x seqs


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine (a single process, or one TP rank) needs."""

    model: str  # checkpoint directory
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bfloat16", "float32", "float64"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    seed: int = 0
    # weights drawn at load from this seed, on the device, instead of read from ``model``'s
    # safetensors (which need not exist): benchmarks of models larger than a disk
    random_weights_seed: int | None = None
    role: str = "colocated"  # "prefill", "decode" or "colocated": picks kernels
    tp: int = 1  # tensor-parallel ranks; > 1 runs one Ray actor per rank
    gpus_per_rank: float = 0.0  # Ray GPU resources per rank (0 on CPU)
    cpus_per_rank: float = 1.0  # Ray CPU resources per rank; also its torch threads
    rank_actors: bool = False  # run even a single rank in a Ray actor (peers other replicas call)
    kernel_overrides: dict[str, str] = field(default_factory=dict)
    # "auto": decode steps replay CUDA graphs on GPUs (roles decode and colocated); "off";
    # "eager": the same padded bucket path without capture (CPU tests of the padding)
    decode_graphs: str = "auto"
    decode_graph_max_batch: int = 128  # larger decode steps run eagerly
    # "auto": steps with prefill chunks replay CUDA graphs on GPUs (roles colocated and
    # prefill; ``mixed_graphs.py``); "off"; "eager": the padded bucket path without capture
    # (CPU tests of the padding)
    mixed_graphs: str = "auto"
    mixed_graph_max_tokens: int = 2048  # steps with more context (chunks + prefixes): eager
    # plan a pure decode step while the one before runs, its input tokens taken on the device
    # from that step's samples (``Scheduler.schedule_ahead``), where the step before replays a
    # decode graph; False plans every step after the tokens before it are back
    plan_ahead: bool = True
    # on GPUs, run the eager step shapes once at start-up (cluster/step_warmup.py) so that
    # their kernels compile before the first request
    warmup_steps: bool = True
    kv_message_timeout_s: float = 60.0  # a point-to-point KV message fails after this long
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        names = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in names:
            raise ValueError(
                f"unsupported dtype {self.dtype!r}; choose auto, bfloat16, float32 or float64"
            )
        return names[self.dtype]
