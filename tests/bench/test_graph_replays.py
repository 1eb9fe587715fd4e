"""bench.graph_replays: medians of CUDA-graph replays, several calls' replays interleaved."""

from __future__ import annotations

import pytest
import torch

from pdserve.bench.graph_replays import ms_graphs


@pytest.mark.gpu
def test_interleaved_medians_follow_the_work():
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def once():
        return a @ a

    def four_times():
        return [a @ a for _ in range(4)]

    one, four = ms_graphs([once, four_times], rep_ms=50)
    assert one > 0
    assert 2.5 < four / one < 5.5  # four matmuls to one, whatever the clocks do meanwhile
    (alone,) = ms_graphs([once], rep_ms=50)
    assert alone == pytest.approx(one, rel=0.5)
