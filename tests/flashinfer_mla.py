"""A small model with DeepSeek's latent widths (512 + 64), the only ones FlashInfer's MLA decode
runs, for the GPU tests of engines and deployments that use it."""

from __future__ import annotations

import pytest

# 16 heads: a TP=8 shard of DeepSeek-V3, and DeepSeek-V2-Lite
WIDE = dict(kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=16, num_key_value_heads=16)


def wide_mla_model(folder) -> str:
    """The ``tiny`` preset at ``WIDE``'s widths, written to ``folder``; skips where FlashInfer's
    fa3 kernels cannot run."""
    import torch

    from pdserve.cluster.checkpoint_maker import make_model
    from pdserve.kernels.mla_decode_flashinfer import unavailable

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("FlashInfer's MLA fa3 kernels are built for sm_90a")
    if reason := unavailable():
        pytest.skip(reason)
    return str(make_model(folder, "tiny", seed=3, overrides=WIDE))
