"""The tensors of one eagerly run step, made from its schedule (integers)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from pdserve.cluster.model.attention_metadata import AttentionMetadata
from pdserve.cluster.scheduler import ScheduledChunk, SchedulerOutput


def context_slots(
    chunk: ScheduledChunk, table: tuple[int, ...], window: int, bs: int
) -> np.ndarray:
    """[end - lo] int64: the cache slots, under ``table`` (of ``bs``-token blocks), of a
    prefill chunk's context: positions lo .. end, the chunk's own tokens last; lo is 0, or
    for layers that see ``window`` tokens, its first query's window start."""
    lo = max(0, chunk.start - window + 1) if window else 0
    pos = np.arange(lo, chunk.end)
    return np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs


@dataclass(frozen=True)
class BatchInputs:
    """The tensors of one step."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [N] int64: the token rows whose logits are sampled

    @staticmethod
    def of(sched: SchedulerOutput, bs: int, device: torch.device, window: int = 0) -> BatchInputs:
        """A step's chunks in order (single-token decode chunks first), on ``device``, for a
        cache of ``bs``-token blocks; with the sliding tables' metadata where chunks carry
        them (their layers see ``window`` tokens: a prefill chunk gathers its context from its
        first query's window on, not from position 0)."""
        ids: list[int] = []
        pos: list[int] = []
        sample_rows: list[int] = []
        dec_lens: list[int] = []
        cu_q = [0]
        max_q = 0
        for c in sched.chunks:
            ids.extend(c.token_ids)
            pos.extend(range(c.start, c.end))
            if c.sample:
                sample_rows.append(len(ids) - 1)
            if len(c.token_ids) == 1:  # decode: paged attention over the block table
                assert not cu_q[1:], "single-token chunks must come before prefill chunks"
                dec_lens.append(c.end)
            else:  # prefill: attend over the context gathered from the cache
                cu_q.append(cu_q[-1] + len(c.token_ids))
                max_q = max(max_q, len(c.token_ids))

        def i32(x):
            return torch.tensor(x, dtype=torch.int32, device=device)

        def i64(x):  # a list or an int64 array
            return torch.as_tensor(np.asarray(x, dtype=np.int64), device=device)

        def meta(tables: list[tuple[int, ...]], window: int) -> AttentionMetadata:
            """The step's metadata over ``tables``, one block table per chunk, for layers
            that see ``window`` tokens (0: all). A prefill chunk's context runs from its first
            query's window on; the kernels align queries to the context's end."""
            dec_slots: list[int] = []
            dec_tables: list[tuple[int, ...]] = []
            own: list[np.ndarray] = []  # prefill chunks' slots
            ctx: list[np.ndarray] = []  # prefill chunks' context slots
            cu_k, max_k = [0], 0
            for c, t in zip(sched.chunks, tables):
                if len(c.token_ids) == 1:
                    dec_slots.append(t[c.start // bs] * bs + c.start % bs)
                    dec_tables.append(t)
                    continue
                slots = context_slots(c, t, window, bs)  # numpy: thousands of positions
                ctx.append(slots)
                own.append(slots[-len(c.token_ids) :])
                cu_k.append(cu_k[-1] + len(slots))
                max_k = max(max_k, len(slots))
            width = max((len(t) for t in dec_tables), default=0)
            table = [list(t) + [0] * (width - len(t)) for t in dec_tables]
            return AttentionMetadata(
                slot_mapping=i64(np.concatenate([np.asarray(dec_slots, np.int64), *own])),
                num_decode_tokens=len(dec_lens),
                decode_block_table=i32(table).view(len(table), width),
                decode_seq_lens=i32(dec_lens),
                prefill_cu_seqlens_q=i32(cu_q),
                prefill_cu_seqlens_k=i32(cu_k),
                prefill_ctx_slots=i64(np.concatenate(ctx) if ctx else np.zeros(0, np.int64)),
                prefill_max_q=max_q,
                prefill_max_k=max_k,
            )

        full = meta([c.block_ids for c in sched.chunks], 0)
        if sched.chunks and sched.chunks[0].window_block_ids:
            sliding = meta([c.window_block_ids for c in sched.chunks], window)
            full = replace(full, window=sliding)
        return BatchInputs(i64(ids), i64(pos), full, i64(sample_rows))
