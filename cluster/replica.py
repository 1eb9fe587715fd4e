"""What a prefill and a decode replica share: the engine on its thread, the KV transport, the
layout fingerprint, and stats reported to the app's registry."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import ray
import torch

from pdserve.cluster import trace_file
from pdserve.cluster.async_engine import AsyncEngine
from pdserve.cluster.config import EngineConfig
from pdserve.cluster.engine import LLMEngine
from pdserve.cluster.faults import FaultInjector
from pdserve.cluster.kv_layout import KVFingerprint, fingerprint
from pdserve.cluster.kv_transport import make_transport
from pdserve.cluster.replica_registry import REPORT_PERIOD_S, get_registry
from pdserve.cluster.replica_stats import ReplicaStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a prefill or decode replica is built from (made by deploy's app builder)."""

    app: str  # the Serve application: names the registry
    pool: str  # "prefill" or "decode"
    engine: EngineConfig  # role set to "prefill", "decode" or "colocated"
    kv_transport: str  # resolved: "object_store" (or "nccl" on GPUs)
    weights_digest: str  # identifies the checkpoint, part of the KV fingerprint
    generation: str = ""  # a digest of the app's args: replicas of an older config are ignored
    faults: dict[str, float] = field(default_factory=dict)  # injected failure rates, per point
    prefill_timeout_s: float = 30.0  # decode: a prefill call slower than this fails (and retries)
    kv_transfer_timeout_s: float = 10.0  # decode: a KV receive slower than this fails
    prefill_retries: int = 1  # decode: more attempts after a failed prefill or transfer
    local_prefill_fallback: bool = True  # decode: prefill locally when every attempt failed
    # a replica whose last N requests all failed on its side, over at least failure_streak_s
    # seconds, reports itself unhealthy, so Serve replaces it rather than routing more requests
    # into it (0: never). The span keeps one failed step of a big batch from counting as N.
    max_consecutive_failures: int = 16
    failure_streak_s: float = 30.0
    # prefill: serve decode replicas' calls over a direct TCP line besides Serve (only with
    # the point-to-point KV transport, whose handles may travel over it)
    direct_line: bool = True


class Replica:
    engine_cls: type[LLMEngine] = LLMEngine

    def __init__(self, spec: WorkerSpec) -> None:
        logging.basicConfig(level=logging.INFO)
        self.spec = spec
        self.serve_id = _serve_replica_tag()  # Serve's replica id (routers know it)
        self.replica_id = f"{spec.pool}-{self.serve_id}"
        if spec.engine.tp == 1 and not spec.engine.rank_actors:
            torch.set_num_threads(max(1, int(spec.engine.cpus_per_rank)))
        start = time.perf_counter()
        self.engine = self.engine_cls(spec.engine)
        self.faults = FaultInjector(spec.faults, seed=hash(self.replica_id) & 0xFFFFFFFF)
        self.engine.faults = self.faults
        if self.faults.active:
            log.warning("%s injects faults: %s", self.replica_id, self.faults.rates)
        self.aengine = AsyncEngine(self.engine, name=f"engine-{self.replica_id}")
        self.transport = make_transport(spec.kv_transport)
        runner = self.engine.runner
        digest = spec.weights_digest
        if spec.engine.random_weights_seed is not None:  # a draw depends on the device's model
            digest += f" drawn on {runner.device_name}"  # (a GPU's SM count): refuse a mix
        self.fingerprint: KVFingerprint = fingerprint(
            self.engine.model_config,
            digest,
            spec.engine.resolve_dtype(spec.engine.resolve_device()),
            spec.engine.cache.block_size,
        )
        self.stats = ReplicaStats(
            pool=spec.pool,
            replica_id=self.replica_id,
            generation=spec.generation,
            node=ray.util.get_node_ip_address() if ray.is_initialized() else "",
            device=runner.device_name,
            tp=spec.engine.tp,
            kernels=dict(runner.kernel_names),
            kv_transport=spec.kv_transport,
            serve_id=self.serve_id,
            kv_blocks_total=runner.num_blocks,
        )
        log.info(
            "%s ready in %.1fs: role %s, %s, tp %d, %d KV blocks of %d tokens, kernels %s",
            self.replica_id,
            time.perf_counter() - start,
            spec.engine.role,
            runner.device_name,
            spec.engine.tp,
            runner.num_blocks,
            spec.engine.cache.block_size,
            runner.kernel_names,
        )
        self.failure_streak = 0  # requests this replica failed in a row (see check_health)
        self.failure_streak_since = 0.0  # when the first of them failed (monotonic)
        self._stop = threading.Event()
        self._wake = threading.Event()  # report now: a request just ended
        self._registry = get_registry(spec.app) if ray.is_initialized() else None
        self._reporter = threading.Thread(target=self._report_loop, daemon=True)
        self._reporter.start()
        trace_file.watch_gc()

    # ---- stats ----

    def snapshot_stats(self) -> ReplicaStats:
        e = self.engine
        s = self.stats
        s.running, s.waiting = len(e.scheduler.running), len(e.scheduler.waiting)
        s.kv_blocks_used = e.blocks.num_used
        s.preemptions = e.scheduler.num_preemptions
        s.prefix_query_tokens = e.scheduler.num_prefix_query_tokens
        s.prefix_hit_tokens = e.scheduler.num_prefix_hit_tokens
        s.kv_blocks_cached = e.blocks.num_cached
        s.kv_blocks_parked = e.blocks.num_parked
        t = self.transport.stats
        s.kv_transfers, s.kv_bytes, s.kv_seconds = t.transfers, t.nbytes, t.seconds
        s.kv_bytes_saved = t.saved_nbytes
        s.heartbeat = time.time()
        return s

    def _report_loop(self) -> None:
        last_busy, last_t = 0.0, time.perf_counter()
        while not self._stop.is_set():
            self._wake.wait(REPORT_PERIOD_S)
            self._wake.clear()
            now = time.perf_counter()
            self.stats.busy = (self.aengine.busy_s - last_busy) / max(now - last_t, 1e-9)
            last_busy, last_t = self.aengine.busy_s, now
            if self._registry is None or not ray.is_initialized():
                continue
            try:
                self._registry.report.remote(self.snapshot_stats())
                self.after_report(self._registry)
            except SystemExit:  # Ray raises it in calls once it shuts this process down
                return
            except Exception as e:  # noqa: BLE001 - the registry may be restarting
                log.warning("stats report failed: %s", e)

    def after_report(self, registry) -> None:
        """Runs on the reporter thread after each report (decode replicas read the prefill
        pool's lines here)."""

    def request_ended(self, failed: bool | None = None) -> None:
        """``failed``: True when this replica failed the request (not the client, nor a full
        queue), False when it served it, None when neither says anything about its health."""
        if failed is not None:
            if failed and not self.failure_streak:
                self.failure_streak_since = time.monotonic()
            self.failure_streak = self.failure_streak + 1 if failed else 0
        self._wake.set()

    # ---- Serve hooks ----

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if not self.aengine._thread.is_alive():
            raise RuntimeError(f"{self.replica_id}: the engine thread died")
        if stopped := self.engine.runner.stopped:
            raise RuntimeError(f"{self.replica_id}: {stopped}")
        limit, n = self.spec.max_consecutive_failures, self.failure_streak
        span = time.monotonic() - self.failure_streak_since
        if limit and n >= limit and span >= self.spec.failure_streak_s:
            raise RuntimeError(
                f"{self.replica_id}: its last {n} requests failed, over {span:.0f}s; "
                "asking Serve to replace it"
            )

    def shutdown(self) -> None:
        """Leave the registry, stop reporting, stop the engine loop, release the ranks."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if self._registry is not None and ray.is_initialized():
            try:
                self._registry.leave.remote(self.replica_id)
            except Exception:  # noqa: BLE001 - the registry may be gone already
                pass
        self.aengine.shutdown()
        self.engine.runner.shutdown()

    def __del__(self) -> None:  # Serve's teardown hook
        if hasattr(self, "_stop"):
            self.shutdown()


def _serve_replica_tag() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not inside Serve (tests, scripts)
        return f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
