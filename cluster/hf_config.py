"""A checkpoint's config.json read into a ``ModelConfig``: DeepSeek-V3's (V2-Lite, V3, R1,
Kimi-K2, Moonlight) or GPT-OSS's. Anything the engine cannot run is a ValueError naming it and
what is supported."""

from __future__ import annotations

from typing import Any

from pdserve.cluster.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeConfig

LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' GptOssConfig default, which config.json may leave out
GPT_OSS_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


def model_config(cfg: dict[str, Any]) -> ModelConfig:
    archs = cfg.get("architectures") or ["DeepseekV3ForCausalLM"]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {archs[0]!r}; supported: {SUPPORTED_ARCHITECTURES}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only silu")
    if archs[0] == "GptOssForCausalLM":
        return _gpt_oss(cfg)
    return _deepseek(cfg)


def eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    """``eos_token_id`` of a config.json or generation_config.json dict: one id, a list, or none."""
    eos = cfg.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))


def _deepseek(cfg: dict[str, Any]) -> ModelConfig:
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"unsupported scoring_func {cfg['scoring_func']!r}; only sigmoid")
    method, fp8_block = _quantization(cfg.get("quantization_config") or {})
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        n_routed_experts=cfg["n_routed_experts"],
        n_shared_experts=cfg.get("n_shared_experts") or 0,
        num_experts_per_tok=cfg["num_experts_per_tok"],
        n_group=cfg.get("n_group") or 1,
        topk_group=cfg.get("topk_group") or 1,
        first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope=RopeConfig.from_hf(cfg),
        rope_interleave=bool(cfg.get("rope_interleave", True)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg),
        quant_method=method,
        fp8_block=fp8_block,
        checkpoint_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
    )


def _gpt_oss(cfg: dict[str, Any]) -> ModelConfig:
    """GPT-OSS in DeepSeek's terms: every layer MoE (``intermediate_size`` is each expert's),
    no shared experts, one routing group, rope over the whole head in split halves."""
    method, _ = _quantization(cfg.get("quantization_config") or {})
    if method == "fp8":
        raise ValueError("unsupported quantization 'fp8' for GptOssForCausalLM; only mxfp4")
    # absent keys take GptOssConfig's defaults; an explicit null, what transformers derives
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", 8) or heads
    head_dim = cfg.get("head_dim", 64) or cfg["hidden_size"] // heads
    if heads % kv_heads:
        raise ValueError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    window = int(cfg.get("sliding_window", 128) or 0)  # null: sliding layers see everything
    types = tuple(cfg.get("layer_types") or [LAYER_TYPES[i % 2] for i in range(layers)])
    if len(types) != layers or set(types) - set(LAYER_TYPES):
        raise ValueError(f"layer_types {list(types)} must name one of {LAYER_TYPES} per layer")
    rope = cfg
    if not (cfg.get("rope_parameters") or cfg.get("rope_scaling")):  # transformers' default
        rope = {**cfg, "rope_parameters": GPT_OSS_ROPE}
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 128
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        moe_intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        q_lora_rank=None,
        kv_lora_rank=0,
        qk_nope_head_dim=0,
        qk_rope_head_dim=head_dim,
        v_head_dim=head_dim,
        n_routed_experts=experts,
        n_shared_experts=0,
        num_experts_per_tok=cfg.get("num_experts_per_tok") or 4,  # as transformers reads it
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        norm_topk_prob=True,  # softmax over the chosen logits: weights sum to 1
        routed_scaling_factor=1.0,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
        rope=RopeConfig.from_hf({"rope_theta": 150000.0, **rope}),
        rope_interleave=False,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg),
        quant_method=method,
        checkpoint_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        architecture="GptOssForCausalLM",
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        sliding_window=window,
        layer_types=types,
        swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
        swiglu_beta=1.0,  # GPT-OSS adds 1 to the up half
        swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
    )


def _quantization(quant: dict[str, Any]) -> tuple[str, tuple[int, int] | None]:
    """(quant_method, fp8 block shape) of a ``quantization_config``; ValueError naming what is
    supported for anything else."""
    if not quant:
        return "", None
    method = quant.get("quant_method")
    if method == "mxfp4":
        return method, None
    if method != "fp8":
        raise ValueError(
            f"unsupported quantization {method!r}; supported: mxfp4 (routed experts in the "
            "GPT-OSS layout) and fp8 (E4M3 weights with 128x128 block scales, as DeepSeek "
            "publishes them)"
        )
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"unsupported fp8 fmt {quant['fmt']!r}; only e4m3")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(
            f"unsupported fp8 activation_scheme {quant['activation_scheme']!r}; only dynamic"
        )
    block = quant.get("weight_block_size")
    if block is None or list(block) != [128, 128]:
        raise ValueError(
            f"unsupported fp8 weight_block_size {block!r}; only [128, 128] (one scale per "
            "128x128 block, DeepSeek's layout)"
        )
    return method, (128, 128)
