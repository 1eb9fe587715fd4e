"""Model shapes ``pdserve make-model`` can build, as Hugging Face config.json dicts."""

from __future__ import annotations

import copy
from typing import Any

_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_act": "silu",
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "initializer_range": 0.02,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 0,
    "use_cache": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    # seconds on CPU; every dim split-able by tensor parallelism 2 and MXFP4 blocks of 32
    "tiny": {
        "vocab_size": None,  # the trained tokenizer's size
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rope_scaling": None,
    },
    # DeepSeek-V2-Lite's published dims in the V3 architecture (sigmoid routing, one group)
    "deepseek-v2-lite": {
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 1.0,
        "max_position_embeddings": 163840,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    },
    # DeepSeek-V3's dims, 4 layers: 1 dense + 3 MoE
    "deepseek-v3-4l": {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 163840,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
}
# DeepSeek-V3 whole (671B parameters): 3 dense layers, then 58 MoE layers. Its random MXFP4
# checkpoint (about 360 GB of experts) exceeds most disks: draw it at load instead
# (`make-model --config-only`, then model.random_weights_seed)
PRESETS["deepseek-v3"] = {
    **PRESETS["deepseek-v3-4l"],
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
}


# GPT-OSS: the released config.json's fields (eos ids are the trained tokenizer's, set by the
# checkpoint maker); every other layer a sliding window of 128 tokens, the first one sliding
_GPT_OSS: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "hidden_act": "silu",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "num_experts_per_tok": 4,
    "experts_per_token": 4,
    "sliding_window": 128,
    "rms_norm_eps": 1e-5,
    "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "rope_theta": 150000.0,
    "rope_scaling": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    },
    "use_cache": True,
}
GPT_OSS_PRESETS: dict[str, dict[str, Any]] = {
    # seconds on CPU: 4 layers (2 sliding of 8 tokens), 8 experts, GQA groups of 2
    "gpt-oss-tiny": {
        "vocab_size": None,
        "hidden_size": 128,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "num_local_experts": 8,
        "sliding_window": 8,
        "max_position_embeddings": 2048,
        "rope_scaling": {**_GPT_OSS["rope_scaling"], "original_max_position_embeddings": 64},
    },
    "gpt-oss-20b": {
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 24,
        "num_local_experts": 32,
    },
    "gpt-oss-120b": {
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 36,
        "num_local_experts": 128,
    },
}
PRESETS.update(GPT_OSS_PRESETS)


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    common = _GPT_OSS if name in GPT_OSS_PRESETS else _COMMON
    cfg = {**copy.deepcopy(common), **copy.deepcopy(PRESETS[name])}
    for key, value in (overrides or {}).items():
        cfg[key] = value
    if name in GPT_OSS_PRESETS and "layer_types" not in (overrides or {}):
        kinds = ("sliding_attention", "full_attention")
        cfg["layer_types"] = [kinds[i % 2] for i in range(cfg["num_hidden_layers"])]
    return cfg
