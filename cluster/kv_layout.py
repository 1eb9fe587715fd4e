"""The paged KV layout both sides of a transfer must share, and its fingerprint."""

from __future__ import annotations

import msgspec
import torch

from cluster.config import ModelConfig
from cluster.errors import KVLayoutMismatch


class KVFingerprint(msgspec.Struct, frozen=True):
    """What makes a block copy between two replicas meaningful. Compared when a prefill and a
    decode replica first meet; any difference is a deployment error, never a silent corruption."""

    model: str  # architecture + dims, e.g. "DeepseekV3ForCausalLM/h7168/l61/v129280"
    weights: str  # a digest of the checkpoint's config (same shapes, same weights directory)
    dtype: str  # cache dtype, e.g. "bfloat16"
    block_size: int
    num_layers: int
    row_width: int  # kv_lora_rank + rope dim
    tp: int

    def check(self, other: KVFingerprint) -> None:
        if self != other:
            diffs = [
                f"{f}: {getattr(self, f)!r} vs {getattr(other, f)!r}"
                for f in self.__struct_fields__
                if getattr(self, f) != getattr(other, f)
            ]
            raise KVLayoutMismatch(f"prefill and decode KV layouts differ ({'; '.join(diffs)})")


def fingerprint(
    cfg: ModelConfig, weights_digest: str, dtype: torch.dtype, block_size: int, tp: int
) -> KVFingerprint:
    return KVFingerprint(
        model=f"DeepseekV3ForCausalLM/h{cfg.hidden_size}/l{cfg.num_hidden_layers}/v{cfg.vocab_size}",
        weights=weights_digest,
        dtype=str(dtype).removeprefix("torch."),
        block_size=block_size,
        num_layers=cfg.num_hidden_layers,
        row_width=cfg.kv_cache_dim,
        tp=tp,
    )
