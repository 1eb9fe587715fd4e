"""The prefill pool as a decode replica reaches it over direct lines (``cluster/line_client.py``).

The registry lists the prefill replicas that serve a line and their load (the replica's
reporter thread refreshes the list, ``update``). ``choose`` picks among those a request has not
tried yet like Serve's router does: two at random, the less loaded (its reported prompts plus
the calls this replica has open to it). With none left, the caller goes through Serve instead.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pdserve.cluster.line_client import LineClient
from pdserve.cluster.replica_stats import PrefillLine


class PrefillLines:
    def __init__(self) -> None:
        self._known: tuple[PrefillLine, ...] = ()  # replaced whole: read by the event loop
        self._clients: dict[str, LineClient] = {}  # by address; made on the event loop

    def update(self, lines: Sequence[PrefillLine]) -> None:
        """The registry's current list (any thread)."""
        self._known = tuple(lines)

    @property
    def known(self) -> tuple[PrefillLine, ...]:
        return self._known

    def choose(self, avoid: Sequence[str]) -> tuple[str, LineClient] | None:
        """(Serve id, client) of the replica to call, or None when no line is left to try."""
        known = self._known
        self._forget_gone({line.address for line in known})
        left = [line for line in known if line.serve_id not in avoid]
        if not left:
            return None
        pick = min(
            random.sample(left, min(2, len(left))),
            key=lambda line: line.inflight + self._client(line.address).ongoing,
        )
        return pick.serve_id, self._client(pick.address)

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
