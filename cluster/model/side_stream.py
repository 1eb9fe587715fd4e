"""Two independent branches of a layer run side by side in a captured decode graph.

At decode batch sizes a layer is a chain of small kernels, each too short to fill the GPU: a
GEMV of a few megabytes spends much of its time ramping up and draining. Where two parts of a
layer read the same input and nothing of each other (the shared experts and the routed experts;
the query and the KV latent projections), ``beside`` runs one on a second CUDA stream while a
graph is captured: the replayed graph then has both branches in flight at once, and one's tail
overlaps the other's work. The main branch's result is joined before either is used.

Only captures branch. There the allocator hands a block freed by one stream only to later
allocations on that stream: a side branch's tensor freed after the join is reused by a later
side branch, which starts after its own fork; inputs both branches read are held by the caller
until the join. An eager call would need every cross-stream tensor recorded with the allocator.
Eager calls (prefill, CPU, decode graphs off) run the side branch first, then the main one, so
an eager step computes what the replayed graph does, kernel for kernel.

The side stream is one of torch's pooled streams, as the capture stream is: pooled streams
are handed out in turn, so after 32 more are taken (two per KV pair group) one may also serve
another thread, whose work during a capture's branch would enter the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

A = TypeVar("A")
B = TypeVar("B")

_streams: dict[int, torch.cuda.Stream] = {}  # device index -> the side stream of its captures


def _side(device: torch.device) -> torch.cuda.Stream:
    """The device's side stream. Taken from torch's stream pool (made once per device, by
    ``torch.cuda.graph`` before any capture), so no stream is created during a capture."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(index)
    return _streams[index]


def beside(side: Callable[[], A], main: Callable[[], B], like: torch.Tensor) -> tuple[A, B]:
    """(side(), main()): concurrently on ``like``'s device while its current stream is being
    captured into a CUDA graph, else one after the other. ``side`` must not read what ``main``
    writes, nor the reverse; both may read their common inputs, which the caller holds until
    this returns (after the join), so no branch's memory is handed to the other meanwhile."""
    if not (like.is_cuda and torch.cuda.is_current_stream_capturing()):
        return side(), main()
    current = torch.cuda.current_stream(like.device)
    stream = _side(like.device)
    stream.wait_stream(current)  # the fork: the side branch starts after what came before
    try:
        with torch.cuda.stream(stream):
            a = side()
        b = main()
    finally:  # joined even when a branch raises, so its error is the capture's first
        current.wait_stream(stream)  # the join: what comes after waits for both
    return a, b
