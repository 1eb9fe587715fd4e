"""The app's registry: replicas report their stats to one named actor; the ingress and the CLI
read it for health, Prometheus metrics and status.

A replica is live while its reports keep coming (every ``REPORT_PERIOD_S``); one silent for
``STALE_S`` is dropped, which is how a dead replica leaves /health and /metrics. Replicas built
from an earlier config of the app (an older ``generation``; scaling keeps the generation, a
redeploy with other args starts a new one) are left out as soon as the new config is deployed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from pdserve.cluster.replica_stats import HANDOFF, Histogram, PrefillLine, ReplicaStats

NAMESPACE = "pdserve"
REPORT_PERIOD_S = 0.25
STALE_S = 5.0


def registry_name(app: str) -> str:
    return f"registry-{app}"


class RegistryState:
    """The registry's state; ``ReplicaRegistry`` is this class as a Ray actor."""

    def __init__(self) -> None:
        self._stats: dict[str, ReplicaStats] = {}
        self._app_args: dict[str, Any] | None = None
        self._generation = ""

    def report(self, stats: ReplicaStats) -> None:
        self._stats[stats.replica_id] = stats

    def leave(self, replica_id: str) -> None:
        self._stats.pop(replica_id, None)

    def snapshot(self) -> list[ReplicaStats]:
        now = time.time()
        for rid, s in list(self._stats.items()):
            old = self._generation and s.generation != self._generation
            if old or now - s.heartbeat > STALE_S:
                del self._stats[rid]
        return list(self._stats.values())

    def prefill_lines(self) -> list[PrefillLine]:
        """The live prefill replicas with a direct line, and their load."""
        return [
            PrefillLine(s.serve_id, s.line, s.inflight)
            for s in self.snapshot()
            if s.pool == "prefill" and s.line
        ]

    def set_app_args(self, args: dict[str, Any], generation: str) -> None:
        self._app_args, self._generation = args, generation

    def app_args(self) -> dict[str, Any] | None:
        return self._app_args


ReplicaRegistry = ray.remote(num_cpus=0)(RegistryState)


def get_registry(app: str):
    """The app's registry actor, created on first use; it outlives any single replica."""
    return ReplicaRegistry.options(
        name=registry_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def pools(stats: list[ReplicaStats]) -> dict[str, list[ReplicaStats]]:
    out: dict[str, list[ReplicaStats]] = {"prefill": [], "decode": []}
    for s in stats:
        out.setdefault(s.pool, []).append(s)
    return out


class ClusterView:
    """Read side of the registry: what /health, /metrics and ``pdserve status`` show."""

    def __init__(self, app: str, colocated: bool | None = None) -> None:
        self.app = app
        self.colocated = colocated  # None: read from the app's args, which the builder stored
        self._registry = None

    async def snapshot(self) -> list[ReplicaStats]:
        if self._registry is None:
            self._registry = get_registry(self.app)
        return await asyncio.wait_for(self._registry.snapshot.remote(), timeout=5)

    async def health(self) -> tuple[bool, dict]:
        by_pool = pools(await self.snapshot())
        if self.colocated is None:
            args = await asyncio.wait_for(self._registry.app_args.remote(), timeout=5)
            self.colocated = not (args or {}).get("prefill")
        needed = ["decode"] if self.colocated else ["prefill", "decode"]
        live = {p: len(by_pool.get(p, [])) for p in ("prefill", "decode")}
        ok = all(live[p] > 0 for p in needed)
        return ok, {
            "live_replicas": live,
            "mode": "colocated" if self.colocated else "disaggregated",
        }

    async def metrics_text(self) -> str:
        return render_prometheus(await self.snapshot())


def render_prometheus(stats: list[ReplicaStats]) -> str:
    """Per-pool sums of every replica's counters, gauges and histograms, Prometheus text 0.0.4."""
    lines: list[str] = []

    def family(name: str, kind: str, doc: str) -> None:
        lines.append(f"# HELP pdserve_{name} {doc}")
        lines.append(f"# TYPE pdserve_{name} {kind}")

    def sample(name: str, labels: dict[str, str], value: float) -> None:
        lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"pdserve_{name}{{{lab}}} {value:g}" if lab else f"pdserve_{name} {value:g}")

    by_pool = pools(stats)
    family("replicas", "gauge", "Live replicas per pool.")
    for pool, reps in by_pool.items():
        sample("replicas", {"pool": pool}, len(reps))
    family("requests_total", "counter", "Requests finished, by pool and outcome.")
    for pool, reps in by_pool.items():
        outcomes: dict[str, int] = {}
        for r in reps:
            for k, v in r.requests.items():
                outcomes[k] = outcomes.get(k, 0) + v
        for k, v in sorted(outcomes.items()):
            sample("requests_total", {"pool": pool, "outcome": k}, v)
    sums = (
        ("prompt_tokens_total", "counter", "Prompt tokens processed.", "prompt_tokens"),
        ("output_tokens_total", "counter", "Tokens generated.", "output_tokens"),
        (
            "kv_transfers_total",
            "counter",
            "KV transfers sent (prefill) or received (decode).",
            "kv_transfers",
        ),
        (
            "kv_transfer_bytes_total",
            "counter",
            "KV bytes sent (prefill) or received (decode).",
            "kv_bytes",
        ),
        ("kv_transfer_seconds_total", "counter", "Seconds spent moving KV.", "kv_seconds"),
        (
            "kv_transfer_saved_bytes_total",
            "counter",
            "KV bytes not sent: the decode replica's prefix cache held those blocks.",
            "kv_bytes_saved",
        ),
        (
            "preemptions_total",
            "counter",
            "Requests preempted for lack of KV blocks.",
            "preemptions",
        ),
        (
            "prefix_cache_queries_total",
            "counter",
            "Prompt tokens admitted to a batch (decode: handed over by prefill), looked up "
            "in the prefix cache.",
            "prefix_query_tokens",
        ),
        (
            "prefix_cache_hits_total",
            "counter",
            "Prompt tokens whose KV the prefix cache held: not computed (decode: not received).",
            "prefix_hit_tokens",
        ),
        (
            "line_calls_total",
            "counter",
            "Prefill calls taken on the prefill replicas' direct lines (not through Serve).",
            "line_calls",
        ),
        ("running_requests", "gauge", "Requests in the running batch.", "running"),
        ("waiting_requests", "gauge", "Requests queued for their first step.", "waiting"),
        ("inflight_requests", "gauge", "Requests held by the pool in any stage.", "inflight"),
        ("kv_blocks_used", "gauge", "KV cache blocks in use.", "kv_blocks_used"),
        ("kv_blocks_total", "gauge", "KV cache blocks in all.", "kv_blocks_total"),
        (
            "kv_blocks_cached",
            "gauge",
            "Free KV blocks that keep a prefix's KV for reuse.",
            "kv_blocks_cached",
        ),
        (
            "kv_blocks_parked",
            "gauge",
            "KV blocks let go but held until the steps in flight on the device land (in use).",
            "kv_blocks_parked",
        ),
    )
    for name, kind, doc, field in sums:
        family(name, kind, doc)
        for pool, reps in by_pool.items():
            sample(name, {"pool": pool}, sum(getattr(r, field) for r in reps))
    family("kv_blocks_free", "gauge", "KV cache blocks free.")
    for pool, reps in by_pool.items():
        sample(
            "kv_blocks_free",
            {"pool": pool},
            sum(r.kv_blocks_total - r.kv_blocks_used for r in reps),
        )
    for name, field, doc in (
        ("time_to_first_token_seconds", "ttft", "Time to first token, as each pool sees it."),
        ("time_per_output_token_seconds", "tpot", "Time between output tokens (decode pool)."),
    ):
        family(name, "histogram", doc)
        for pool, reps in by_pool.items():
            h = Histogram()
            for r in reps:
                h.merge(getattr(r, field))
            _histogram(sample, name, {"pool": pool}, h)
    family("handoff_seconds", "histogram", "A disaggregated request's handoff, by phase.")
    for pool, reps in by_pool.items():
        for phase in HANDOFF:
            h = Histogram()
            for r in reps:
                if phase in r.handoff:
                    h.merge(r.handoff[phase])
            if h.count:
                _histogram(sample, "handoff_seconds", {"pool": pool, "phase": phase}, h)
    return "\n".join(lines) + "\n"


def _histogram(sample, name: str, labels: dict[str, str], h: Histogram) -> None:
    cum = 0
    for bound, c in zip((*h.bounds, float("inf")), h.counts):
        cum += c
        le = "+Inf" if bound == float("inf") else f"{bound:g}"
        sample(f"{name}_bucket", {**labels, "le": le}, cum)
    sample(f"{name}_sum", labels, h.total)
    sample(f"{name}_count", labels, h.count)
