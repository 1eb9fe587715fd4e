"""Kernel times from CUDA-graph replays: each call captured once, then its replays timed with
CUDA events, the L2 flushed (a 256 MB memset) before each replay, outside the timed region.

Several calls timed together have their replays interleaved (round robin: A, B, A, B, ...), so
that a drift of the GPU's clocks or memory over the run moves every call's median alike: two
timings of the same MoE tiles taken seconds apart in one sweep differed by up to 6% on an H100
(BENCHMARKS.md, "The candidates timed"), more than most candidates differ from each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _capture(call: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of call(), compiled and warmed up on a side stream first."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


def _event_pair() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def ms_graphs(calls: list[Callable[[], object]], rep_ms: float = 100.0) -> list[float]:
    """Median milliseconds of one replay of each call's CUDA graph, the replays interleaved:
    rounds of one replay per call, as many rounds as fill about rep_ms of replays (5 to 1000).
    Needs CUDA."""
    assert torch.cuda.is_available(), "ms_graphs times CUDA graphs"
    graphs = [_capture(call) for call in calls]
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    rounds = max(5, min(1000, int(rep_ms / 1e3 / max(time.perf_counter() - t0, 1e-6))))
    events = [[_event_pair() for _ in graphs] for _ in range(rounds)]
    for row in events:
        for graph, (start, end) in zip(graphs, row, strict=True):
            flush.zero_()
            start.record()
            graph.replay()
            end.record()
    torch.cuda.synchronize()
    medians = []
    for i in range(len(graphs)):
        times = sorted(row[i][0].elapsed_time(row[i][1]) for row in events)
        medians.append(times[len(times) // 2])
    del graphs
    return medians
