"""Awaitable calls to a ``KVPeer``: in this process (on the peer's own threads), in a rank
actor (through Ray), or in another replica's process over its direct line
(``cluster/line_server.py``), the same way; only the remote kinds can travel to another replica
inside a ``KVHandle``."""

from __future__ import annotations

import asyncio
from typing import Any

from pdserve.cluster.kv_transport.kv_peer import WAITING_CALLS, KVPeer
from pdserve.cluster.line_client import LineClient


class PeerClient:
    """Awaitable calls to a KVPeer: ``actor`` (a rank actor with ``kv`` and ``kv_wait``
    methods) or ``line`` (the "host:port" of a replica serving ``kv`` calls on its line) when
    remote, ``local`` (the peer itself) in this process."""

    def __init__(
        self,
        peer_id: str,
        actor: Any = None,
        local: KVPeer | None = None,
        line: str | None = None,
    ) -> None:
        assert sum(x is not None for x in (actor, local, line)) == 1
        self.peer_id, self.actor, self.local, self.line = peer_id, actor, local, line

    def call(self, name: str, *args: Any) -> Any:
        """Submitted now, in call order (transfers take turns, so order matters); await it."""
        waits = name in WAITING_CALLS
        if self.line is not None:
            return asyncio.ensure_future(_over_line(self.line, name, args))
        if self.actor is not None:
            return (self.actor.kv_wait if waits else self.actor.kv).remote(name, *args)
        pool = self.local.wait_pool if waits else self.local.pool
        return asyncio.get_running_loop().run_in_executor(pool, self.local.call, name, *args)

    def __reduce__(self):
        if self.local is not None:
            raise TypeError(
                "a local KV peer cannot leave its process: serve it on a line or a rank actor"
            )
        return (PeerClient, (self.peer_id, self.actor, None, self.line))


async def _over_line(address: str, name: str, args: tuple) -> Any:
    (result,) = [x async for x in LineClient.shared(address).stream("kv", (name, args))]
    return result
