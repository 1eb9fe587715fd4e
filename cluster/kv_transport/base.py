"""The KV transport contract: how a request's prompt KV goes from a prefill replica to the decode
replica that continues it.

Prefill side: ``send(kv, dest)`` ships a ``[layers, n_blocks, block_size, width]`` tensor (the
blocks of one request, in order) towards ``dest`` and returns a ``KVHandle``, which travels back to
decode inside the ``PrefillResult``. Decode side: ``receive(handle, dest)`` returns that tensor,
ready to scatter into the blocks ``dest.block_ids`` names. Every transport counts bytes and
seconds; each must keep the order of transfers per (prefill, decode) pair and must not deadlock
with many requests in flight.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from cluster.messages import KVDestination, KVHandle


@dataclass
class TransferStats:
    transfers: int = 0
    nbytes: int = 0
    seconds: float = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        self.transfers += 1
        self.nbytes += nbytes
        self.seconds += seconds


class KVTransport(ABC):
    name: str

    def __init__(self) -> None:
        self.stats = TransferStats()

    def endpoint(self) -> Any:
        """What a decode replica puts in ``KVDestination.endpoint`` so prefill can reach it."""
        return None

    @abstractmethod
    async def send(self, kv: torch.Tensor, dest: KVDestination) -> KVHandle:
        """Prefill side: ship one request's KV blocks to ``dest``."""

    @abstractmethod
    async def receive(self, handle: KVHandle, dest: KVDestination) -> torch.Tensor:
        """Decode side: the KV ``handle`` announces, as [layers, n_blocks, block_size, width]."""
