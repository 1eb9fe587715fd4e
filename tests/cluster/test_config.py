from __future__ import annotations

import math

import pytest

from pdserve.cluster.config import EngineConfig, ModelConfig, RopeConfig, yarn_mscale
from pdserve.cluster.presets import preset_config

YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def test_published_and_transformers5_rope_styles_agree():
    published = {"max_position_embeddings": 163840, "rope_theta": 10000, "rope_scaling": YARN}
    v5 = {
        "max_position_embeddings": 163840,
        "rope_parameters": {
            **{k: v for k, v in YARN.items() if k != "type"},
            "rope_type": "yarn",
            "rope_theta": 10000,
        },
    }
    assert RopeConfig.from_hf(published) == RopeConfig.from_hf(v5)
    assert RopeConfig.from_hf({"rope_theta": 5000}) == RopeConfig(theta=5000.0)


def test_deepseek_v3_softmax_scale_has_the_yarn_correction():
    cfg = ModelConfig.from_hf(preset_config("deepseek-v3-4l"))
    m = 0.1 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert cfg.kv_cache_dim == 576 and cfg.qk_head_dim == 192
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert yarn_mscale(1.0) == 1.0


def test_v2_lite_preset_has_no_q_lora():
    cfg = ModelConfig.from_hf(preset_config("deepseek-v2-lite"))
    assert cfg.q_lora_rank is None and cfg.n_routed_experts == 64 and cfg.num_experts_per_tok == 6
    assert cfg.moe_intermediate_size == 1408 and cfg.hidden_size == 2048


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "architecture"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"rope_scaling": {"type": "longrope"}}, "rope type"),
        ({"quantization_config": {"quant_method": "fp8"}}, r"weight_block_size None.*\[128, 128\]"),
        ({"quantization_config": {"quant_method": "awq"}}, "'awq'; supported: mxfp4 .* and fp8"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
            r"weight_block_size \[64, 64\]",
        ),
        (
            {"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}},
            "fp8 fmt 'e5m2'; only e4m3",
        ),
        (
            {
                "quantization_config": {
                    "quant_method": "fp8",
                    "activation_scheme": "static",
                    "weight_block_size": [128, 128],
                }
            },
            "activation_scheme 'static'; only dynamic",
        ),
    ],
)
def test_unsupported_configs_are_named(change, needle):
    cfg = preset_config("tiny", {"vocab_size": 100, **change})
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_hf(cfg)


def test_full_v3_preset_has_v3s_layers_and_parameter_count():
    cfg = ModelConfig.from_hf(preset_config("deepseek-v3"))
    assert cfg.num_hidden_layers == 61 and cfg.first_k_dense_replace == 3
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(61))
    experts = moe_layers * (cfg.n_routed_experts + 1) * 3 * 7168 * 2048  # routed + shared
    assert moe_layers == 58 and 650e9 < experts < 660e9  # of V3's 671B


def test_deepseeks_fp8_quantization_config_is_read():
    fp8 = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    cfg = ModelConfig.from_hf(
        preset_config("tiny", {"vocab_size": 100, "quantization_config": fp8})
    )
    assert cfg.quant_method == "fp8" and cfg.fp8_block == (128, 128)
    plain = ModelConfig.from_hf(preset_config("tiny", {"vocab_size": 100}))
    assert plain.quant_method == "" and plain.fp8_block is None


def test_engine_config_dtype_and_device():
    import torch

    cfg = EngineConfig(model="x", device="cpu")
    assert cfg.resolve_dtype(torch.device("cpu")) == torch.float32
    assert cfg.resolve_dtype(torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="float8"):
        EngineConfig(model="x", dtype="float8").resolve_dtype(torch.device("cpu"))
