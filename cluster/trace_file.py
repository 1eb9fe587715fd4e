"""Per-transfer timing records of a deployment's KV hand-offs, written to a folder when the
environment variable ``PDSERVE_KV_TRACE`` names one (off by default; ``bench.kv_trace`` reads
them).

Each process that takes part in a hand-off appends one JSON line per transfer to
``<folder>/<pid>.jsonl``: who wrote it ("prefill peer", "decode peer", "prefill replica",
"decode replica"), the transfer id, and its phase times as ``time.perf_counter()`` values.
On Linux that clock is the system's monotonic clock, the same in every process of a host, so
the records of one transfer from its two ends line up on one time axis (the KV peers of a pair
on different hosts do not, and ``bench.kv_trace`` keeps only one host's).
"""

from __future__ import annotations

import json
import os
import threading
from typing import IO

ENV = "PDSERVE_KV_TRACE"

_lock = threading.Lock()
_file: tuple[str, IO[str]] | None = None  # (folder, the open record file in it)


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def record(side: str, transfer_id: str, times: dict[str, float]) -> None:
    """Append one transfer's phase times from ``side``; nothing unless tracing is on."""
    global _file
    folder = os.environ.get(ENV)
    if not folder:
        return
    line = json.dumps({"side": side, "tid": transfer_id, "t": times})
    with _lock:
        if _file is None or _file[0] != folder:
            if _file is not None:
                _file[1].close()
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{os.getpid()}.jsonl")
            _file = (folder, open(path, "a", buffering=1))  # noqa: SIM115 - kept open
        _file[1].write(line + "\n")
