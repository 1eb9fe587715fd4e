"""Triton compilations in this process, timed as they happen.

Triton compiles a kernel at its first launch with a new specialization: new ``constexpr`` values
(another config bucket), integer arguments that newly equal 1 or divide by 16, pointers of
another alignment. Each compile (or load from Triton's disk cache) runs on the launching thread
and takes from milliseconds to seconds, so a step that meets one stalls every request in it.
Start-up compiles what its profile run, warm-ups and graph captures launch; ``serving()`` marks
its end, and each compile after it is logged as a warning naming the kernel, its ``constexpr``
values and the time it took: a slow first request can then be told from a slow GPU.

``install()`` sets Triton's ``jit_cache_hook`` (called before a compile) and
``jit_post_compile_hook`` (after it), keeping hooks set before. Triton calls neither for
kernels it interprets (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compile:
    kernel: str  # the kernel's qualified name
    constants: str  # its constexpr values, "NAME=value, ..."
    start: float  # time.perf_counter() when Triton began
    seconds: float
    serving: bool  # after start-up


class CompileWatch:
    def __init__(self, keep: int = 256) -> None:
        self._lock = threading.Lock()
        self._started: dict[tuple[int, Any], float] = {}  # (thread, key) -> start
        self._recent: deque[Compile] = deque(maxlen=keep)
        self._count = [0, 0]  # compiles at start-up, while serving
        self._seconds = [0.0, 0.0]
        self._serving = False
        self._previous: tuple[Any, Any] = (None, None)
        self._installed = False

    def install(self) -> None:
        """Hook into Triton (once per watch; a no-op where Triton is not installed)."""
        try:
            from triton import knobs
        except ImportError:
            return
        with self._lock:
            if self._installed:
                return
            rt = knobs.runtime
            self._previous = (rt.jit_cache_hook, rt.jit_post_compile_hook)
            rt.jit_cache_hook, rt.jit_post_compile_hook = self._before, self._after
            self._installed = True

    def serving(self) -> None:
        """Start-up is over: log what it compiled; later compiles are warnings."""
        with self._lock:
            if self._serving:
                return
            self._serving = True
            count, seconds = self._count[0], self._seconds[0]
        if count:
            log.info("Triton compiled %d kernel variants at start-up in %.1f s", count, seconds)

    def totals(self) -> dict[str, tuple[int, float]]:
        """(compiles, seconds) at start-up and while serving."""
        with self._lock:
            return {
                "start-up": (self._count[0], self._seconds[0]),
                "serving": (self._count[1], self._seconds[1]),
            }

    def recent(self) -> list[Compile]:
        with self._lock:
            return list(self._recent)

    # ---- Triton's hooks (keyword arguments as ``JITFunction._call_hook`` passes them) ----

    def _before(self, *, key: Any, **kwargs: Any) -> bool | None:
        at = (threading.get_ident(), _hashable(key))
        with self._lock:
            self._started[at] = time.perf_counter()
        previous = self._previous[0]
        # a true result tells Triton to skip the compile: only a hook set before may say so
        skip = previous(key=key, **kwargs) if previous is not None else None
        if skip:  # no compile, so no after-hook call to end this one
            with self._lock:
                self._started.pop(at, None)
        return skip

    def _after(self, *, key: Any, fn: Any, compile: dict, **kwargs: Any) -> Any:
        stop = time.perf_counter()
        with self._lock:
            start = self._started.pop((threading.get_ident(), _hashable(key)), stop)
            serving = self._serving
            done = Compile(_name(fn), _constants(fn, compile), start, stop - start, serving)
            self._recent.append(done)
            self._count[serving] += 1
            self._seconds[serving] += done.seconds
        if serving:
            log.warning(
                "Triton compiled %s while serving: %.0f ms (%s)",
                done.kernel,
                1e3 * done.seconds,
                done.constants,
            )
        previous = self._previous[1]
        return previous(key=key, fn=fn, compile=compile, **kwargs) if previous else None


def _hashable(key: Any) -> Any:
    try:
        hash(key)
        return key
    except TypeError:
        return repr(key)


def _name(fn: Any) -> str:
    """``JitFunctionInfo``: module (a name, or the module) and name."""
    module = getattr(fn, "module", "?")
    return f"{getattr(module, '__name__', module)}.{getattr(fn, 'name', '?')}"


def _constants(fn: Any, compile: dict) -> str:
    """The constexpr values by parameter name (Triton keys them by argument path tuples)."""
    params = getattr(getattr(fn, "jit_function", None), "arg_names", None) or []
    out = []
    for path, value in (compile.get("constants") or {}).items():
        index = path[0] if isinstance(path, tuple) and path else path
        name = params[index] if isinstance(index, int) and index < len(params) else str(path)
        out.append(f"{name}={value}")
    return ", ".join(out)


WATCH = CompileWatch()  # the process's watch: model runners install it on GPU
