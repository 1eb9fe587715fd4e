"""One model runner's end of point-to-point KV transfers.

A ``KVPeer`` lives where a runner's KV cache lives: in the replica's own process (one rank) or in
each tensor-parallel rank actor. On the prefill side it keeps a device copy of each finished
prompt's blocks ("staged") until a decode replica pulls it through a pair group; on the decode
side it receives a message and scatters it into reserved blocks. ``PeerClient`` calls a peer in
this process (through a thread) or in a rank actor (through Ray) with the same awaitable calls,
and only the remote kind can travel to another replica inside a ``KVHandle``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from cluster.kv_transport.pair_group import DECODE, PairGroup, listen

if TYPE_CHECKING:
    from cluster.model_runner import ModelRunner

log = logging.getLogger(__name__)

STAGED_TTL_S = 120.0  # staged KV nobody pulled is dropped after this long
_CALLS = (
    "stage",
    "take",
    "drop",
    "count",
    "connect",
    "send_staged",
    "listen",
    "accept",
    "recv_into",
    "close",
)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


class KVPeer:
    def __init__(self, runner: ModelRunner, timeout_s: float = 60.0) -> None:
        self.runner = runner
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._staged: dict[str, tuple[torch.Tensor, float]] = {}
        self._groups: dict[str, PairGroup] = {}
        self._stores: dict[str, Any] = {}

    # ---- prefill side ----

    def stage(self, transfer_id: str, block_ids: list[int]) -> int:
        """Copy the blocks (on the runner's device) before the scheduler frees them."""
        kv = self.runner.read_kv(block_ids)  # [layers, n, block_size, width], contiguous
        now = time.monotonic()
        with self._lock:
            for tid in [t for t, (_, at) in self._staged.items() if now - at > STAGED_TTL_S]:
                log.warning("dropping KV of %s: never collected in %.0fs", tid, STAGED_TTL_S)
                del self._staged[tid]
            self._staged[transfer_id] = (kv, now)
        return kv.numel() * kv.element_size()

    def take(self, transfer_id: str) -> torch.Tensor:
        with self._lock:
            return self._staged.pop(transfer_id)[0]

    def drop(self, transfer_id: str) -> None:
        with self._lock:
            self._staged.pop(transfer_id, None)

    def count(self) -> int:
        """Staged copies held now (a leak shows here)."""
        with self._lock:
            return len(self._staged)

    def connect(self, key: str, host: str, port: int) -> None:
        group = PairGroup.connect(host, port, key, self.runner.device, self.timeout_s)
        with self._lock:
            self._groups[key] = group

    def send_staged(self, transfer_id: str, key: str, last: bool = True) -> int:
        """Send a staged copy through group ``key`` and forget it, unless another decode rank
        still needs it (``last`` False; then ``drop`` forgets it)."""
        with self._lock:
            kv = self._staged[transfer_id][0] if not last else self._staged.pop(transfer_id)[0]
        self._groups[key].send(kv)
        return kv.numel() * kv.element_size()

    # ---- decode side ----

    def listen(self, key: str) -> tuple[str, int]:
        host = _node_ip()
        store = listen(host, self.timeout_s)
        with self._lock:
            self._stores[key] = store
        return host, store.port

    def accept(self, key: str) -> None:
        with self._lock:
            store = self._stores.pop(key)
        group = PairGroup(store, key, DECODE, self.runner.device, self.timeout_s)
        with self._lock:
            self._groups[key] = group

    def recv_into(self, key: str, shape: tuple[int, ...], dtype: str, block_ids: list[int]) -> int:
        buf = torch.empty(shape, dtype=getattr(torch, dtype), device=self.runner.device)
        self._groups[key].recv(buf)
        self.runner.write_kv(block_ids, buf)
        if buf.is_cuda:
            torch.cuda.current_stream(buf.device).synchronize()
        return buf.numel() * buf.element_size()

    # ---- both sides ----

    def close(self, key: str) -> None:
        """Forget group ``key`` after a failed message: its order (NCCL matches by order) can no
        longer be trusted, so the next transfer between the pair builds a fresh group."""
        with self._lock:
            group = self._groups.pop(key, None)
            self._stores.pop(key, None)
        if group is not None:
            group.close()

    def call(self, name: str, *args: Any) -> Any:
        if name not in _CALLS:
            raise ValueError(f"unknown KV peer call {name!r}")
        return getattr(self, name)(*args)


class PeerClient:
    """Awaitable calls to a KVPeer: ``actor`` (a rank actor with a ``kv`` method) when remote,
    ``local`` (the peer itself) in this process."""

    def __init__(self, peer_id: str, actor: Any = None, local: KVPeer | None = None) -> None:
        assert (actor is None) != (local is None)
        self.peer_id, self.actor, self.local = peer_id, actor, local

    async def call(self, name: str, *args: Any) -> Any:
        if self.actor is not None:
            return await self.actor.kv.remote(name, *args)
        return await asyncio.to_thread(self.local.call, name, *args)

    def __reduce__(self):
        if self.local is not None:
            raise TypeError("a local KV peer cannot leave its process; prefill needs rank actors")
        return (PeerClient, (self.peer_id, self.actor))


def local_peer_id() -> str:
    return f"{_node_ip()}:{os.getpid()}"
