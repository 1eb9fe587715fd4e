"""A deadline for a blocking wait that cannot take a timeout itself (``cudaEventSynchronize``):
a thread checks once per tick whether the armed wait has outlasted its bound and, if so, calls
``expire`` (which must make the wait return: aborting the NCCL communicator ends its kernels).

Arming and disarming only set a field: the waiting thread pays no wake-up of another thread, and
the watchdog's own thread wakes once per tick whatever the traffic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TICK_S = 0.5  # how late past its deadline a stuck wait is noticed, at most


class Watchdog:
    def __init__(self, expire: Callable[[], None], name: str, tick_s: float = TICK_S) -> None:
        self._expire, self._tick_s = expire, tick_s
        self._lock = threading.Lock()
        self._deadline: float | None = None  # monotonic time the armed wait must end by
        self._fired = False
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def arm(self, seconds: float) -> None:
        """Start bounding one wait (one at a time)."""
        with self._lock:
            assert self._deadline is None, "watchdog armed twice"
            self._deadline, self._fired = time.monotonic() + seconds, False

    def disarm(self) -> bool:
        """End the bound; whether it expired (``expire`` was called) meanwhile."""
        with self._lock:
            self._deadline = None
            return self._fired

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._tick_s):
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                if late:
                    self._deadline, self._fired = None, True
            if late:
                log.warning("a wait outlasted its bound; expiring it")
                self._expire()
