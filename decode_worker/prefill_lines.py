"""The prefill pool as a decode replica reaches it over direct lines (``cluster/line_client.py``).

The registry lists the prefill replicas that serve a line and their load (the replica's
reporter thread refreshes the list, ``update``). ``choose`` picks among those a request has not
tried yet like Serve's router does: two at random, the less loaded (its reported prompts plus
the calls this replica has open to it). Given the prompt's block keys, the replica this decode
replica last sent the prompt's longest prefix to wins instead, unless it is busier than that
pick by more than ``AFFINITY_SLACK`` calls: it likely still caches the prefix. With none left,
the caller goes through Serve instead.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pdserve.cluster.line_client import LineClient
from pdserve.cluster.replica_stats import PrefillLine
from pdserve.decode_worker.prefix_routes import PrefixRoutes

# how many more calls a replica that holds the prefix may have than the less loaded pick and
# still win: a cache hit saves its prompt's prefix, a queue costs every prompt ahead of it
AFFINITY_SLACK = 2


class PrefillLines:
    def __init__(self) -> None:
        self._known: tuple[PrefillLine, ...] = ()  # replaced whole: read by the event loop
        self._clients: dict[str, LineClient] = {}  # by address; made on the event loop
        self.routes = PrefixRoutes()
        self.affinity_picks = 0  # choices the cached prefix decided, for tests and logs

    def update(self, lines: Sequence[PrefillLine]) -> None:
        """The registry's current list (any thread)."""
        self._known = tuple(lines)

    @property
    def known(self) -> tuple[PrefillLine, ...]:
        return self._known

    def choose(
        self, avoid: Sequence[str], keys: Sequence[bytes] = ()
    ) -> tuple[str, LineClient] | None:
        """(Serve id, client) of the replica to call, or None when no line is left to try.
        ``keys``: the prompt's full-block keys, for the prefix the pool may cache."""
        known = self._known
        self._forget_gone({line.address for line in known})
        left = {line.serve_id: line for line in known if line.serve_id not in avoid}
        if not left:
            return None

        def load(line: PrefillLine) -> int:
            return line.inflight + self._client(line.address).ongoing

        pick = min(random.sample(list(left.values()), min(2, len(left))), key=load)
        chosen, decided = self.routes.prefer(
            keys, set(left), pick.serve_id, lambda sid: load(left[sid]), AFFINITY_SLACK
        )
        self.affinity_picks += decided
        return chosen, self._client(left[chosen].address)

    def _client(self, address: str) -> LineClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = LineClient(address)
        return client

    def _forget_gone(self, addresses: set[str]) -> None:
        """Close lines to replicas the registry no longer lists, once their calls ended."""
        for address, client in list(self._clients.items()):
            if address not in addresses and not client.ongoing:
                del self._clients[address]
                client.drop()
