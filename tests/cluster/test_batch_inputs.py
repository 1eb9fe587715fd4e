"""A step's tensors from its schedule: a decode chunk's paged table, a prefill chunk's context."""

from __future__ import annotations

import dataclasses

import torch

from pdserve.cluster.batch_inputs import BatchInputs
from pdserve.cluster.sampling_params import SamplingParams
from pdserve.cluster.scheduler import ScheduledChunk, SchedulerOutput


def _chunk(tokens, start, blocks, sample=True) -> ScheduledChunk:
    return ScheduledChunk("r", tuple(tokens), start, tuple(blocks), sample, SamplingParams(), 0)


def test_a_decode_then_a_prefill_chunk():
    bs = 4
    decode = _chunk([7], start=5, blocks=[3, 9])  # position 5: block 9, row 1
    prefill = _chunk([1, 2, 3], start=2, blocks=[6, 2], sample=False)  # positions 2-4
    b = BatchInputs.of(SchedulerOutput((decode, prefill)), bs, torch.device("cpu"))
    assert b.input_ids.tolist() == [7, 1, 2, 3]
    assert b.positions.tolist() == [5, 2, 3, 4]
    assert b.sample_rows.tolist() == [0]  # the prefill chunk does not reach its last token
    m = b.meta
    assert m.slot_mapping.tolist() == [9 * bs + 1, 6 * bs + 2, 6 * bs + 3, 2 * bs + 0]
    assert m.num_decode_tokens == 1
    assert m.decode_block_table.tolist() == [[3, 9]] and m.decode_seq_lens.tolist() == [6]
    assert m.prefill_cu_seqlens_q.tolist() == [0, 3] and m.prefill_cu_seqlens_k.tolist() == [0, 5]
    assert m.prefill_ctx_slots.tolist() == [24, 25, 26, 27, 8]  # the context, positions 0-4
    assert (m.prefill_max_q, m.prefill_max_k) == (3, 5)


def test_decode_tables_are_padded_to_the_longest():
    chunks = (_chunk([1], 0, [4]), _chunk([2], 6, [5, 8]))
    m = BatchInputs.of(SchedulerOutput(chunks), 4, torch.device("cpu")).meta
    assert m.decode_block_table.tolist() == [[4, 0], [5, 8]]
    assert m.decode_block_table.dtype == torch.int32 and m.slot_mapping.dtype == torch.int64


def test_sliding_tables_get_their_own_metadata_and_a_context_from_the_window():
    bs, window, null = 4, 3, 99
    decode = dataclasses.replace(_chunk([7], 9, [3, 9, 5]), window_block_ids=(null, 1, 2))
    prefill = dataclasses.replace(  # positions 6-9: the first query sees 4-6
        _chunk([1, 2, 3, 4], 6, [6, 7, 8], sample=False), window_block_ids=(null, 10, 11)
    )
    m = BatchInputs.of(SchedulerOutput((decode, prefill)), bs, torch.device("cpu"), window).meta
    assert m.prefill_cu_seqlens_k.tolist() == [0, 10] and m.prefill_max_k == 10
    w = m.window
    assert w.slot_mapping.tolist() == [2 * bs + 1, 10 * bs + 2, 10 * bs + 3, 11 * bs, 11 * bs + 1]
    assert w.decode_block_table.tolist() == [[null, 1, 2]] and w.decode_seq_lens.tolist() == [10]
    assert w.prefill_cu_seqlens_q.tolist() == [0, 4]
    assert w.prefill_cu_seqlens_k.tolist() == [0, 6] and w.prefill_max_k == 6  # positions 4-9
    assert w.prefill_ctx_slots.tolist() == [40, 41, 42, 43, 44, 45]
    assert w.window is None and BatchInputs.of(SchedulerOutput((decode,)), bs, "cpu").meta.window


def test_two_prefill_chunks_keep_their_order_in_slots_and_context():
    bs = 4
    first = _chunk([1, 2], start=3, blocks=[5, 6])  # positions 3-4: context 0-4
    second = _chunk([3, 4, 5], start=0, blocks=[8])  # positions 0-2
    m = BatchInputs.of(SchedulerOutput((first, second)), bs, torch.device("cpu")).meta
    assert m.num_decode_tokens == 0 and m.decode_block_table.shape == (0, 0)
    assert m.slot_mapping.tolist() == [5 * bs + 3, 6 * bs, 8 * bs, 8 * bs + 1, 8 * bs + 2]
    assert m.prefill_ctx_slots.tolist() == [20, 21, 22, 23, 24, 32, 33, 34]
    assert m.prefill_cu_seqlens_k.tolist() == [0, 5, 8] and m.prefill_cu_seqlens_q.tolist() == [
        0,
        2,
        5,
    ]
