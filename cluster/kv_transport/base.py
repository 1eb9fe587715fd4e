"""The KV transport contract: how a request's prompt KV goes from a prefill replica to the decode
replica that continues it.

Prefill side: when a prompt finishes, its blocks are staged in the executor (a device copy, kept
after the scheduler frees the blocks); ``send(executor, transfer_id, dest)`` hands them to the
transport and returns a ``KVHandle``, which travels back to decode inside the ``PrefillResult``.
A transport whose receive can start before the prompt ends (point to point) also ``announce``s
the handle when the prompt is admitted, so decode posts its receive early.
Decode side: ``receive(handle, dest, executor, wait_s)`` writes the KV into the blocks
``dest.block_ids`` names and returns once they hold it. Only the blocks from
``dest.first_block`` on travel: decode holds those before in its own prefix cache. Every
transport counts bytes and seconds; each must keep the order of transfers per (prefill, decode)
pair and must not deadlock with many in flight.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from pdserve.cluster.executor import Executor
from pdserve.cluster.messages import KVDestination, KVHandle


@dataclass
class TransferStats:
    transfers: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    # decode side: bytes the same transfers would have carried for the blocks the decode
    # replica held from its own prefix cache (``KVDestination.first_block``), so never sent
    saved_nbytes: int = 0

    def add(self, nbytes: int, seconds: float, saved_nbytes: int = 0) -> None:
        self.transfers += 1
        self.nbytes += nbytes
        self.seconds += seconds
        self.saved_nbytes += saved_nbytes


def held_nbytes(handle: KVHandle, dest: KVDestination) -> int:
    """Bytes of the blocks ``dest`` held already, at the size ``handle``'s blocks have."""
    return handle.nbytes // max(handle.num_blocks, 1) * dest.first_block


class KVTransport(ABC):
    name: str

    def __init__(self) -> None:
        self.stats = TransferStats()

    def endpoint(self) -> Any:
        """What a decode replica puts in ``KVDestination.endpoint`` so prefill can reach it."""
        return None

    def announce(
        self, executor: Executor, transfer_id: str, dest: KVDestination
    ) -> KVHandle | None:
        """Prefill side, at admission: a handle decode may start receiving from while the prompt
        still runs, or None when the KV can only be collected after ``send``."""
        return None

    def phases(self, transfer_id: str) -> dict[str, float] | None:
        """Decode side, after ``receive``: when (``time.perf_counter`` on the receiving rank's
        host) that rank got the prefill's word ("signalled") and saw the blocks written
        ("received"), where the transport knows, and forgets them; None otherwise."""
        return None

    @abstractmethod
    async def send(self, executor: Executor, transfer_id: str, dest: KVDestination) -> KVHandle:
        """Prefill side: ship the KV staged under ``transfer_id`` towards ``dest``."""

    @abstractmethod
    async def receive(
        self, handle: KVHandle, dest: KVDestination, executor: Executor, wait_s: float = 60.0
    ) -> None:
        """Decode side: the KV ``handle`` announces, into the executor's ``dest.block_ids``;
        ``wait_s`` bounds the wait for a prompt still running when the receive was posted."""
