"""Layer slots and sliding-window block arithmetic, on configs alone."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.cluster.config import ModelConfig
from pdserve.cluster.kv_groups import KVGroups
from pdserve.cluster.presets import preset_config
from pdserve.cluster.sampling_params import SamplingParams
from pdserve.cluster.scheduler import ScheduledChunk


def _cfg(preset: str) -> ModelConfig:
    return ModelConfig.from_hf(preset_config(preset))


def test_full_layers_get_a_slot_each():
    g = KVGroups.of(_cfg("deepseek-v3-4l"))
    assert g.slot_of == (0, 1, 2, 3) and g.num_slots == 4
    assert not g.windowed
    assert g.window_start_block(10_000, 64) == 0
    assert g.window_blocks(1000, 64) == 0 and g.peak_window_blocks(8192, 64) == 0
    assert g.slots_done_after() == [[0], [1], [2], [3]]


def test_a_full_and_a_sliding_layer_share_a_slot():
    cfg = _cfg("gpt-oss-20b")  # 24 layers, sliding first, alternating
    g = KVGroups.of(cfg)
    assert g.window == 128 and g.num_slots == 12
    assert g.slot_of[:6] == (0, 0, 1, 1, 2, 2)
    done = g.slots_done_after()
    assert done[:4] == [[], [0], [], [1]] and done[-1] == [11]
    assert sorted(s for d in done for s in d) == list(range(12))


def test_uneven_groups_and_slots_done_out_of_order():
    g = KVGroups.from_windows([0, 0, 0, 8])
    assert g.slot_of == (0, 1, 2, 0) and g.num_slots == 3 and g.window == 8
    # slot 0 is written again by the last layer: nothing leaves before it
    assert g.slots_done_after() == [[], [], [], [0, 1, 2]]


def test_different_windows_are_refused():
    with pytest.raises(ValueError, match=r"different windows \[8, 16\]"):
        KVGroups.from_windows([8, 0, 16, 0])


@pytest.mark.parametrize("window,bs", [(6, 4), (128, 64), (5, 1), (64, 64)])
def test_window_blocks_cover_exactly_what_the_next_queries_read(window, bs):
    g = KVGroups((0, 0), window)
    for n in range(1, 5 * window):
        first = g.window_start_block(n, bs)
        # the query at n reads n - window + 1 .. n - 1 from the cache (and itself)
        lo = max(0, n - window + 1)
        assert first == lo // bs
        assert g.window_blocks(n, bs) == -(-n // bs) - first
        for chunk in (1, 3, 17):  # a chunk from n reads from its first query's window on
            held = -(-(n + chunk) // bs) - first
            assert held <= g.peak_window_blocks(chunk, bs), (n, chunk)
            full = -(-n // bs)
            assert g.most_blocks(n, chunk, bs) == full + min(full, g.peak_window_blocks(chunk, bs))
    assert KVGroups((0, 1), 0).most_blocks(100, 16, bs) == -(-100 // bs)  # no sliding layers


def test_a_prompts_kv_travels_from_the_first_block_decode_lacks_then_its_window():
    """The prefill side sends the full layers' blocks from ``first_sent_block`` on, then the
    sliding layers' blocks of the window at the prompt's end: the decode side's order."""
    chunk = ScheduledChunk(
        request_id="r", token_ids=(1,) * 4, start=16, block_ids=(10, 11, 12, 13, 14, 15),
        sample=True, sampling=SamplingParams(), num_output_tokens=0, first_sent_block=2,
        window_block_ids=(0, 0, 0, 23, 24, 25),
    )  # fmt: skip
    # 20 tokens in blocks of 4: blocks 0-4; a window of 6 tokens from position 14: blocks 3-4
    assert KVGroups.from_windows([6, 0]).sent_blocks(chunk, 4) == [12, 13, 14, 23, 24]
    full_only = dataclasses.replace(chunk, window_block_ids=())  # no sliding layers: no table
    assert KVGroups.from_windows([0, 0]).sent_blocks(full_only, 4) == [12, 13, 14]
