"""config.json read as transformers reads it: GPT-OSS's absent keys take GptOssConfig's
defaults, generation_config.json's end tokens count."""

from __future__ import annotations

import json

import pytest

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.hf_config import model_config

BASE = {
    "architectures": ["GptOssForCausalLM"],
    "vocab_size": 1000,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_hidden_layers": 4,
    "num_attention_heads": 64,
}


@pytest.mark.parametrize("extra", [{}, {"sliding_window": None}, {"experts_per_token": 2}])
def test_absent_gpt_oss_keys_take_transformers_defaults(extra):
    from transformers import GptOssConfig

    cfg = {**BASE, **extra}
    ref = GptOssConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    ours = model_config(cfg)
    assert ours.num_key_value_heads == ref.num_key_value_heads
    assert ours.head_dim == ref.head_dim and ours.n_routed_experts == ref.num_local_experts
    assert ours.num_experts_per_tok == ref.num_experts_per_tok
    windows = [
        ref.sliding_window if t == "sliding_attention" and ref.sliding_window else 0
        for t in ref.layer_types
    ]
    assert [ours.window(i) for i in range(4)] == windows


def test_generation_config_end_tokens_join_config_jsons(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": 200002}))
    gen = {"eos_token_id": [200002, 199999, 200012]}
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (200002, 199999, 200012)
