"""Per-transfer timing records of a deployment's KV hand-offs, written to a folder when the
environment variable ``PDSERVE_KV_TRACE`` names one (off by default; ``bench.kv_trace`` reads
them).

Each process that takes part in a hand-off appends one JSON line per transfer to
``<folder>/<pid>.jsonl``: who wrote it ("prefill peer", "decode peer", "prefill replica",
"decode replica"), the transfer id, and its phase times as ``time.perf_counter()`` values.
On Linux that clock is the system's monotonic clock, the same in every process of a host, so
the records of one transfer from its two ends line up on one time axis (the KV peers of a pair
on different hosts do not, and ``bench.kv_trace`` keeps only one host's). A replica or rank
process that calls ``watch_gc`` adds its garbage collections of 1 ms or more (side "gc").
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections import deque
from typing import IO

ENV = "PDSERVE_KV_TRACE"

GC_MIN_S = 1e-3  # collections that paused the process at least this long are recorded

_lock = threading.Lock()
_file: tuple[str, IO[str]] | None = None  # (folder, the open record file in it)
_gc_started = 0.0
_gc_pauses: deque[tuple[int, float, float]] = deque(maxlen=1024)  # (generation, start, stop)


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def watch_gc() -> None:
    """With tracing on, also record this process's garbage collections that held it for
    ``GC_MIN_S`` or more (side "gc", one record per pause: "start" and "stop"; its id says the
    generation), written with the next transfer record. A collection holds the GIL throughout,
    so it stops every thread of the process, a transfer's among them."""
    if enabled() and _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def _on_gc(phase: str, info: dict) -> None:
    global _gc_started
    now = time.perf_counter()
    if phase == "start":
        _gc_started = now
    elif now - _gc_started >= GC_MIN_S:  # no I/O or lock here: it may run inside ``record``
        _gc_pauses.append((info["generation"], _gc_started, now))


def record(side: str, transfer_id: str, times: dict[str, float]) -> None:
    """Append one transfer's phase times from ``side``; nothing unless tracing is on."""
    global _file
    folder = os.environ.get(ENV)
    if not folder:
        return
    lines = []
    while True:
        try:
            gen, start, stop = _gc_pauses.popleft()
        except IndexError:  # none left (another thread may have taken the last)
            break
        tid = f"gc{gen}/{os.getpid()}/{start:.6f}"
        lines.append(json.dumps({"side": "gc", "tid": tid, "t": {"start": start, "stop": stop}}))
    lines.append(json.dumps({"side": side, "tid": transfer_id, "t": times}))
    with _lock:
        if _file is None or _file[0] != folder:
            if _file is not None:
                _file[1].close()
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{os.getpid()}.jsonl")
            _file = (folder, open(path, "a", buffering=1))  # noqa: SIM115 - kept open
        _file[1].write("".join(line + "\n" for line in lines))
