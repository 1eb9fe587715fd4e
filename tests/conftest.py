"""Shared fixtures: tiny random checkpoints made once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

YARN_OVERRIDES = {
    "q_lora_rank": None,
    "max_position_embeddings": 4096,
    "rope_scaling": {
        "type": "yarn",
        "factor": 8,
        "original_max_position_embeddings": 512,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
    },
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The ``tiny`` preset: q_lora_rank set, plain rope, bf16 weights."""
    from cluster.checkpoint_maker import make_model

    return str(make_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0))


@pytest.fixture(scope="session")
def yarn_model(tmp_path_factory) -> str:
    """``tiny`` with q_lora_rank null and YaRN (mscale != mscale_all_dim), float32 weights."""
    from cluster.checkpoint_maker import make_model

    path = tmp_path_factory.mktemp("yarn")
    return str(make_model(path, "tiny", dtype="float32", seed=3, overrides=YARN_OVERRIDES))
