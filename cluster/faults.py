"""Fault injection: fail a chosen fraction of KV transfers, prefills and decode steps on purpose,
to prove the cluster's answers to each (RELIABILITY.md lists them).

Rates come from the app's YAML (``faults: {prefill: 0.05, ...}``) or the environment
(``PDSERVE_FAULTS="prefill=0.05,kv_transfer=0.05,decode_step=0.05"``, read where a replica
starts); the environment wins. Off unless set.
"""

from __future__ import annotations

import os
import random
import threading

from pdserve.cluster.errors import WorkerError

POINTS = ("prefill", "kv_transfer", "decode_step")
ENV = "PDSERVE_FAULTS"


class InjectedFault(WorkerError):
    """A failure made on purpose by the fault injector."""


def parse(spec: str) -> dict[str, float]:
    """``"prefill=0.05,kv_transfer=0.1"`` -> rates; ValueError naming a bad entry."""
    rates: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown fault point {name!r}; points are {POINTS}")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"{ENV}: {item!r} needs a rate, e.g. {name}=0.05") from None
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{ENV}: rate {rate} for {name} is outside [0, 1]")
        rates[name] = rate
    return rates


class FaultInjector:
    def __init__(self, rates: dict[str, float] | None = None, seed: int | None = None) -> None:
        env = os.environ.get(ENV)
        self.rates = parse(env) if env else dict(rates or {})
        unknown = set(self.rates) - set(POINTS)
        if unknown:
            raise ValueError(f"unknown fault points {sorted(unknown)}; points are {POINTS}")
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected = {p: 0 for p in POINTS}

    @property
    def active(self) -> bool:
        return any(r > 0 for r in self.rates.values())

    def maybe_fail(self, point: str, what: str = "") -> None:
        rate = self.rates.get(point, 0.0)
        if rate <= 0.0:
            return
        with self._lock:
            hit = self._rng.random() < rate
            if hit:
                self.injected[point] += 1
        if hit:
            raise InjectedFault(f"injected {point} fault{f' ({what})' if what else ''}")
