"""What each replica reports about itself, a few times a second, to the app's registry."""

from __future__ import annotations

import bisect

import msgspec

# seconds; wide enough for CPU test runs and tight enough for GPU decode
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


# phases of a disaggregated request's handoff, as the decode replica times them (its first token
# goes out with the prefill result; the KV and the join come after)
HANDOFF = {
    "to_decode": "from the ingress having the request to the decode replica having it",
    "before_call": "from the decode replica having the request to its prefill call",
    "prefill_call": "from the prefill call to its result (Ray hops, queue and prefill)",
    "to_prefill": "from the call to its arrival at the prefill replica (routing, Ray call)",
    "prefill_remote": "the prefill replica's own share: from the call's arrival to its token",
    "from_prefill": "from the prefill replica's reply to the decode replica having it",
    "first_out": "from the prefill result to the decode replica yielding the first token",
    "kv_signal": "from the prefill result to the decode KV peer having prefill's word (0: before)",
    "kv_written": "from the prefill result to the decode KV peer seeing the blocks written",
    "kv_after_result": "from the prefill result to the KV in the decode blocks (0: before it)",
    "first_pulled": "from the prefill result to the stream asking past the first token",
    "join": "from the KV in the blocks (and the ask) to the decode engine holding the request",
}

P2P_ONLY = ("kv_signal", "kv_written")  # phases only the point-to-point transport times


class Histogram(msgspec.Struct):
    """A Prometheus histogram: counts per upper bound (cumulated when rendered)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = msgspec.field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def merge(self, other: Histogram) -> None:
        assert self.bounds == other.bounds
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total
        self.count += other.count


class PrefillLine(msgspec.Struct, frozen=True):
    """A prefill replica's direct line, as the registry tells decode replicas about it."""

    serve_id: str  # Serve's replica id
    address: str  # "host:port"
    inflight: int  # prompts it was serving at its last report


class ReplicaStats(msgspec.Struct, kw_only=True):
    """One replica's state. Counters only grow; gauges are current values."""

    pool: str  # "prefill" or "decode"
    replica_id: str
    generation: str = ""  # the app config it was built from; a redeploy starts a new one
    node: str = ""
    device: str = ""
    tp: int = 1
    kernels: dict[str, str] = msgspec.field(default_factory=dict)
    kv_transport: str = ""
    serve_id: str = ""  # Serve's replica id (what ``PrefillRequest.avoid`` names)
    line: str = ""  # "host:port" of its direct line (prefill replicas serving one), or ""
    heartbeat: float = 0.0  # time.time() of this report
    # counters
    requests: dict[str, int] = msgspec.field(default_factory=dict)  # by outcome
    prompt_tokens: int = 0
    output_tokens: int = 0
    kv_transfers: int = 0
    kv_bytes: int = 0  # sent (prefill) or received (decode)
    kv_seconds: float = 0.0
    kv_bytes_saved: int = 0  # decode: KV bytes not received, its prefix cache held them
    preemptions: int = 0
    prefix_query_tokens: int = 0  # prompt tokens admitted to the engine's batch
    prefix_hit_tokens: int = 0  # of which the prefix cache held the KV (decode: not received)
    line_calls: int = 0  # prefill: prefill calls taken on its direct line
    # gauges
    running: int = 0
    waiting: int = 0
    inflight: int = 0  # requests this replica is serving, in any stage
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_blocks_cached: int = 0  # unreferenced blocks kept for prefix hits (counted as free)
    kv_blocks_parked: int = 0  # let go, held until the steps in flight land (counted as used)
    busy: float = 0.0  # share of recent wall time spent in model steps
    # latency histograms
    ttft: Histogram = msgspec.field(default_factory=Histogram)
    tpot: Histogram = msgspec.field(default_factory=Histogram)
    # a disaggregated request's way to its first token, by phase (decode pool): see HANDOFF
    handoff: dict[str, Histogram] = msgspec.field(default_factory=dict)

    def observe_handoff(self, phase: str, seconds: float) -> None:
        assert phase in HANDOFF, phase
        self.handoff.setdefault(phase, Histogram()).observe(seconds)

    def count(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1
