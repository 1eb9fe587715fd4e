"""Per-step attention inputs, built by the model runner and read by every attention layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each token's KV goes and what each query attends to.

    The batch holds ``num_decode_tokens`` single-token sequences first (absorbed paged decode),
    then the prefill chunks (up-projected attention over each sequence's whole context).
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each token
    num_decode_tokens: int
    decode_block_table: torch.Tensor  # [Bd, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [Bd] int32, the new token included
    prefill_cu_seqlens_q: torch.Tensor  # [Sp + 1] int32 offsets into the prefill tokens
    prefill_cu_seqlens_k: torch.Tensor  # [Sp + 1] int32 offsets into prefill_ctx_slots
    prefill_ctx_slots: torch.Tensor  # [Tk] int64: cache slots of each prefill sequence's context
    prefill_max_q: int
    prefill_max_k: int
    # sliding layers' own (``kv_groups``): the same fields over the sliding tables, or None
    # where the model has no sliding layers
    window: AttentionMetadata | None = None

    @property
    def num_prefill_tokens(self) -> int:
        return self.slot_mapping.shape[0] - self.num_decode_tokens
