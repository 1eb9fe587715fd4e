"""One model runner's end of point-to-point KV transfers (``peer_client.py`` calls it).

A ``KVPeer`` lives where a runner's KV cache lives: in the replica's own process (one rank) or in
each tensor-parallel rank actor. On the prefill side it keeps a device copy of each finished
prompt's blocks ("staged") until a decode replica pulls it through a pair group; on the decode
side it receives a message and scatters it into reserved blocks.

Transfers on a pair take turns by a sequence number the decode replica hands out, so both ends
issue their messages in the same order (NCCL matches by order) however the calls arrive, and the
decode side can post a transfer long before the prompt's prefill ends: the prefill end waits for
its staged copy (or for word that it will never come), signals the decode end on the pair's
signal line and sends; the decode end waits for the signal, then receives. A prompt that failed
costs one signal, not the pair.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pdserve.cluster import trace_file
from pdserve.cluster.kv_layout import block_rows, gather_blocks, host_rows, scatter_blocks
from pdserve.cluster.kv_transport.pair_group import DECODE, PairGroup, layer_groups, listen

if TYPE_CHECKING:
    from pdserve.cluster.model_runner import ModelRunner

log = logging.getLogger(__name__)

STAGED_TTL_S = 120.0  # staged KV nobody pulled is dropped after this long
WAIT_THREADS = 64  # transfers a peer can have posted and waiting at once
# calls that wait for their turn, a prompt or a signal: on threads apart from the quick ones
WAITING_CALLS = ("send_staged", "recv_into")
_CALLS = (
    "stage", "take", "drop", "count", "trace", "connect", "listen", "accept", "close",
    *WAITING_CALLS,
)  # fmt: skip


class KVNotSent(RuntimeError):
    """The prefill end said the KV will not come (its prompt failed or was dropped); the pair
    stays usable."""


def node_ip() -> str:
    """This node's address for other processes to reach (127.0.0.1 outside Ray)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


@dataclass
class _Pair:
    group: PairGroup
    next_seq: int = 0  # the transfer whose turn it is
    closed: bool = False


@dataclass
class _Staged:
    kv: torch.Tensor  # [slots, n, block_size, width]
    # per slot group of the copy: (slots, event recorded after it on the stream that made
    # it); a send of slot group g waits for its copy alone. Empty on CPU
    ready: list[tuple[slice, torch.cuda.Event]]
    at: float
    called: float  # perf_counter when ``stage`` began, and when the copy was queued
    queued: float


class KVPeer:
    def __init__(self, runner: ModelRunner, timeout_s: float = 60.0) -> None:
        self.runner = runner
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._staged: dict[str, _Staged] = {}
        self._dropped: dict[str, float] = {}  # transfer id -> when: a send still to come fails
        self._pairs: dict[str, _Pair] = {}
        self._stores: dict[str, Any] = {}
        # (transfer id, {phase: time.perf_counter()}) of recent transfers, for the bench
        self._trace: deque[tuple[str, dict[str, float]]] = deque(maxlen=256)
        self.wait_pool = ThreadPoolExecutor(WAIT_THREADS, thread_name_prefix="kv-wait")
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="kv")
        self._copy_stream: torch.cuda.Stream | None = None  # streamed staging copies

    def _copier(self) -> torch.cuda.Stream:
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.runner.device)
        return self._copy_stream

    # ---- prefill side ----

    def layer_marks(self, num_blocks: list[int]) -> dict[int, torch.cuda.Event]:
        """Events for a step that finishes prompts of ``num_blocks`` blocks each, to record
        once every layer writing cache slot i is queued (``CausalLM.forward``'s
        ``after_layer``): one after the last slot of every slot group but the last of each
        prompt's KV (``layer_groups``, over the cache's slots). Empty on CPU, and when every
        such KV is one message."""
        if self.runner.device.type != "cuda":
            return {}
        marks = {g.stop - 1 for n in num_blocks for g in self._layer_groups(n)[:-1]}
        return {i: torch.cuda.Event() for i in sorted(marks)}

    def _layer_groups(self, num_blocks: int) -> list[slice]:
        """The slot groups of a KV of ``num_blocks`` blocks of the runner's cache."""
        cache = self.runner.kv_caches  # [slots, blocks, block_size, width]
        return layer_groups(cache.shape[0], cache.shape[0] * num_blocks * cache[0, 0].nbytes)

    def stage(
        self,
        transfer_id: str,
        block_ids: list[int],
        layer_done: dict[int, torch.cuda.Event] | None = None,
    ) -> int:
        """Copy the blocks (on the runner's device) before the scheduler frees them, layer
        group by layer group (``layer_groups``): a send waits for each group's copy, not for
        the caller, and sends group g while g + 1 is copied. Queued on the current stream
        behind the step that wrote the KV; with ``layer_done`` (``layer_marks``, recorded
        during that step), group g's copy runs on a stream of its own as soon as the step's
        layers up to g are done, so its send overlaps the step's later layers. The current
        stream then waits for the copies: later steps cannot reuse the blocks before."""
        called = time.perf_counter()
        cache = self.runner.kv_caches  # [slots, blocks, block_size, width]
        shape = (cache.shape[0], len(block_ids), *cache.shape[2:])
        groups = self._layer_groups(len(block_ids))
        streamed = cache.is_cuda and any(g.stop - 1 in (layer_done or {}) for g in groups[:-1])
        if streamed:
            current, copier = torch.cuda.current_stream(), self._copier()
            step_end = torch.cuda.Event()
            step_end.record(current)
        ready = []
        # on the copy stream, memory the step still uses is not handed out
        with torch.cuda.stream(copier) if streamed else contextlib.nullcontext():
            kv = cache.new_empty(shape)  # [slots, n, block_size, width]
            rows = block_rows(cache, block_ids)  # [slots, n]
            for part in groups:
                if streamed:
                    copier.wait_event(layer_done.get(part.stop - 1, step_end))
                gather_blocks(cache, rows, part, kv[part])
                if cache.is_cuda:  # recorded on the stream that made the copy
                    ready.append((part, torch.cuda.Event()))
                    ready[-1][1].record()
        if streamed:
            current.wait_event(ready[-1][1])
        queued, now = time.perf_counter(), time.monotonic()
        with self._cond:
            for tid in [t for t, st in self._staged.items() if now - st.at > STAGED_TTL_S]:
                log.warning("dropping KV of %s: never collected in %.0fs", tid, STAGED_TTL_S)
                del self._staged[tid]
            for tid in [t for t, at in self._dropped.items() if now - at > STAGED_TTL_S]:
                del self._dropped[tid]
            self._staged[transfer_id] = _Staged(kv, ready, now, called, queued)
            self._cond.notify_all()
        return kv.numel() * kv.element_size()

    def take(self, transfer_id: str) -> torch.Tensor:
        with self._cond:
            st = self._staged.pop(transfer_id)
        if st.ready:  # one stream: the last copy's event covers the others
            st.ready[-1][1].synchronize()
        return st.kv

    def drop(self, transfer_id: str) -> None:
        """Forget a staged copy, or one still to come: a send waiting for it gives up."""
        with self._cond:
            self._staged.pop(transfer_id, None)
            self._dropped[transfer_id] = time.monotonic()
            self._cond.notify_all()

    def count(self) -> int:
        """Staged copies held now (a leak shows here)."""
        with self._cond:
            return len(self._staged)

    def trace(self) -> list[tuple[str, dict[str, float]]]:
        """Phase times of recent transfers (and forget them)."""
        with self._cond:
            out = list(self._trace)
            self._trace.clear()
        return out

    def connect(self, key: str, host: str, port: int) -> None:
        group = PairGroup.connect(host, port, key, self.runner.device, self.timeout_s)
        with self._cond:
            self._pairs[key] = _Pair(group)

    def send_staged(
        self, transfer_id: str, key: str, seq: int, last: bool = True, wait_s: float = 60.0
    ) -> int:
        """Transfer ``seq`` of pair ``key``: once it is its turn and the prompt is staged (or
        dropped, or ``wait_s`` passed), signal the decode end and send. Forget the copy unless
        another decode rank still needs it (``last`` False; then ``drop`` forgets it)."""
        pair, deadline, t = self._turn(key, seq, wait_s)
        try:
            with self._cond:
                while transfer_id not in self._staged and transfer_id not in self._dropped:
                    if not self._cond.wait(deadline - time.monotonic()):
                        break
                st = self._staged.get(transfer_id)
                if st is not None and last:
                    del self._staged[transfer_id]
            if st is None:
                why = "dropped" if transfer_id in self._dropped else f"not ready in {wait_s:.0f}s"
                pair.group.signal(transfer_id, f"prefill KV {why}")
                return 0
            t["stage called"], t["copy queued"] = st.called, st.queued
            t["staged"] = time.perf_counter()
            pair.group.signal(transfer_id, "ok")
            t["signalled"] = time.perf_counter()
            pair.group.send_kv(st.kv, st.ready)
            t["sent"] = time.perf_counter()
            self._trace.append((transfer_id, t))
            trace_file.record("prefill peer", transfer_id, t)
            return st.kv.numel() * st.kv.element_size()
        finally:
            self._advance(pair)

    # ---- decode side ----

    def listen(self, key: str) -> tuple[str, int]:
        host = node_ip()
        store = listen(host, self.timeout_s)
        with self._cond:
            self._stores[key] = store
        return host, store.port

    def accept(self, key: str) -> None:
        with self._cond:
            store = self._stores.pop(key)
        group = PairGroup(store, key, DECODE, self.runner.device, self.timeout_s)
        with self._cond:
            self._pairs[key] = _Pair(group)

    def recv_into(
        self,
        key: str,
        seq: int,
        transfer_id: str,
        shape: tuple[int, ...],
        dtype: str,
        block_ids: list[int],
        wait_s: float = 60.0,
    ) -> dict[str, float]:
        """Transfer ``seq`` of pair ``key``: wait for its turn and the prefill end's signal,
        then receive the KV into ``block_ids``; its phase times (``time.perf_counter``:
        "posted", "turn", "signalled", "posted recv", "queued", "received"). ``KVNotSent`` when
        prefill said it will not come; other errors mean the pair can no longer be trusted."""
        cache = self.runner.kv_caches  # [slots, blocks, block_size, width]
        rows = host_rows(cache, block_ids)  # [slots, n]: made before the signal, off its path
        pair, deadline, t = self._turn(key, seq, wait_s)
        try:
            word = pair.group.await_signal(transfer_id, deadline - time.monotonic())
            if word == "closed":
                raise RuntimeError(f"pair {key} closed while {transfer_id} waited")
            if word != "ok":
                raise KVNotSent(f"transfer {transfer_id}: {word}")
            t["signalled"] = time.perf_counter()

            def write(layers: slice, kv: torch.Tensor) -> None:  # [len(layers), n, bs, width]
                nonlocal rows
                if rows.device != cache.device:  # once, by the first part, on the writes'
                    rows = rows.to(cache.device, non_blocking=True)  # stream: later parts arrive
                scatter_blocks(cache, rows, kv, layers)

            timed = trace_file.enabled()
            t.update(pair.group.recv_kv(tuple(shape), getattr(torch, dtype), write, timed))
            t["received"] = time.perf_counter()
            self._trace.append((transfer_id, t))
            trace_file.record("decode peer", transfer_id, t)
            return dict(t)
        finally:
            self._advance(pair)

    # ---- both sides ----

    def _turn(self, key: str, seq: int, wait_s: float) -> tuple[_Pair, float, dict[str, float]]:
        """Wait until transfer ``seq`` of pair ``key`` may go: the pair, the transfer's
        deadline (``wait_s`` from now) and its phase times so far."""
        t = {"posted": time.perf_counter()}
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                pair = self._pairs.get(key)
                if pair is None or pair.closed:
                    raise RuntimeError(f"KV pair {key} is closed")
                if pair.next_seq == seq:
                    t["turn"] = time.perf_counter()
                    return pair, deadline, t
                assert pair.next_seq < seq, f"transfer {seq} of {key} came after its turn"
                if not self._cond.wait(deadline - time.monotonic()):
                    raise TimeoutError(f"transfer {seq} of {key} never got its turn")

    def _advance(self, pair: _Pair) -> None:
        with self._cond:
            pair.next_seq += 1
            self._cond.notify_all()

    def close(self, key: str) -> None:
        """Forget group ``key`` after a failed message: its order (NCCL matches by order) can no
        longer be trusted, so the next transfer between the pair builds a fresh group. Calls
        waiting on it end."""
        with self._cond:
            pair = self._pairs.pop(key, None)
            self._stores.pop(key, None)
            if pair is not None:
                pair.closed = True
            self._cond.notify_all()
        if pair is not None:
            pair.group.close()  # a receive waiting for its signal wakes

    @property
    def _groups(self) -> dict[str, PairGroup]:
        with self._cond:
            return {k: p.group for k, p in self._pairs.items()}

    def call(self, name: str, *args: Any) -> Any:
        if name not in _CALLS:
            raise ValueError(f"unknown KV peer call {name!r}")
        return getattr(self, name)(*args)


def local_peer_id() -> str:
    return f"{node_ip()}:{os.getpid()}"
