"""The kernel choices made from the model alone."""

from __future__ import annotations

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.kernel_choice import unused_ops


def test_the_ops_a_model_never_runs(tiny_model, gpt_oss_model, fp8_model):
    assert unused_ops(ModelConfig.from_dir(tiny_model)) == (
        "gqa_decode",
        "gqa_prefill",
        "rope",
        "linear_fp8",
    )
    assert unused_ops(ModelConfig.from_dir(gpt_oss_model)) == (
        "mla_decode",
        "mla_prefill",
        "mla_kv_write",
        "silu_mul",
        "linear_fp8",
    )
    assert unused_ops(ModelConfig.from_dir(fp8_model)) == ("gqa_decode", "gqa_prefill", "rope")
