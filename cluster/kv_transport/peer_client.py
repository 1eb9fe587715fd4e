"""Awaitable calls to a ``KVPeer``: in this process (on the peer's own threads) or in a rank
actor (through Ray), the same way; only the remote kind can travel to another replica inside a
``KVHandle``."""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.kv_transport.kv_peer import WAITING_CALLS, KVPeer


class PeerClient:
    """Awaitable calls to a KVPeer: ``actor`` (a rank actor with ``kv`` and ``kv_wait``
    methods) when remote, ``local`` (the peer itself) in this process."""

    def __init__(self, peer_id: str, actor: Any = None, local: KVPeer | None = None) -> None:
        assert (actor is None) != (local is None)
        self.peer_id, self.actor, self.local = peer_id, actor, local

    def call(self, name: str, *args: Any) -> Any:
        """Submitted now, in call order (transfers take turns, so order matters); await it."""
        waits = name in WAITING_CALLS
        if self.actor is not None:
            return (self.actor.kv_wait if waits else self.actor.kv).remote(name, *args)
        pool = self.local.wait_pool if waits else self.local.pool
        return asyncio.get_running_loop().run_in_executor(pool, self.local.call, name, *args)

    def __reduce__(self):
        if self.local is not None:
            raise TypeError("a local KV peer cannot leave its process; prefill needs rank actors")
        return (PeerClient, (self.peer_id, self.actor))
