"""A progress bar on stderr: tqdm when it is importable, else a plain-text line.

The plain bar redraws in place (``\\r``) on a terminal; elsewhere (a log file) it prints a line
at most every ``every_s`` seconds, and always the last one.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, every_s: float = 5.0) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done = self.failed = 0
        self.every_s = every_s
        self._start = self._last = time.perf_counter()
        self._tty = sys.stderr.isatty()
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="req", leave=True)

    def update(self, ok: bool) -> None:
        """One more request finished, successfully or not."""
        self.done += 1
        self.failed += not ok
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if self.failed:
                self._bar.set_postfix(errors=self.failed, refresh=False)
            return
        now = time.perf_counter()
        if self._tty or now - self._last >= self.every_s or self.done == self.total:
            self._last = now
            end = "" if self._tty and self.done < self.total else "\n"
            sys.stderr.write(("\r" if self._tty else "") + self._line(now) + end)
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._tty and self.done < self.total:
            sys.stderr.write("\n")

    def _line(self, now: float) -> str:
        width = 30
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        errors = f", {self.failed} errors" if self.failed else ""
        return f"{self.desc} [{bar}] {self.done}/{self.total} {now - self._start:.1f}s{errors}"
