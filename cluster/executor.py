"""What the engine drives: one in-process model runner, or a tensor-parallel group of them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from pdserve.cluster.sampler import SampledToken
from pdserve.cluster.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from pdserve.cluster.kv_transport.peer_client import PeerClient


class Executor(ABC):
    """Runs scheduled steps and owns the KV cache of ``num_blocks`` blocks."""

    num_blocks: int
    kernel_names: dict[str, str]  # op -> backend, for logs and status
    device_name: str
    stopped: str | None = None  # why it can run no more steps (a rank of its group failed)

    @abstractmethod
    def launch(self, sched: SchedulerOutput, feed: Any = None) -> Any:
        """Start one step and return at once where the device allows (the model and the
        sampling queued on a GPU, calls sent to rank processes); ``collect`` its handle. A
        step planned ahead (``sched.feed_rows``) reads its input tokens from ``feed``, the
        handle of the step before it, on the device."""

    def synchronize(self) -> None:  # noqa: B027 - executors that return after the step
        """Wait until every launched step is done on the device."""

    def ahead_rows(self, sched: SchedulerOutput) -> int:
        """How many rows a step planned ahead of ``sched``'s tokens may have (``launch``'s
        ``feed``): 0 where ``sched``, launched, does not leave the host free before the device
        is done, or no such step can follow it."""
        return 0

    @abstractmethod
    def collect(self, handle: Any) -> list[SampledToken]:
        """Wait for a launched step: a sampled token per chunk with ``sample`` set, in chunk
        order."""

    def execute(self, sched: SchedulerOutput) -> list[SampledToken]:
        """One step, start to finish."""
        return self.collect(self.launch(sched))

    @abstractmethod
    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        """[slots, n, block_size, width]: a copy of the given blocks, in order."""

    @abstractmethod
    def write_kv(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Scatter [slots, n, block_size, width] into the given blocks."""

    @abstractmethod
    def stage_kv(self, transfer_id: str, block_ids: list[int]) -> int:
        """Keep a device copy of the blocks for a transfer (before they are freed); bytes."""

    @abstractmethod
    def take_staged(self, transfer_id: str) -> torch.Tensor:
        """Hand over (and forget) a staged copy, on the CPU."""

    @abstractmethod
    def drop_staged(self, transfer_id: str) -> None:
        """Forget a staged copy nobody will collect."""

    @abstractmethod
    def kv_peers(self) -> list[PeerClient]:
        """One KV peer per rank, in rank order, for point-to-point transfers."""

    @property
    @abstractmethod
    def kv_layout(self) -> tuple[int, int, int, str]:
        """(layers, block_size, row width, dtype name) of the KV cache."""

    def shutdown(self) -> None:  # noqa: B027 - most executors hold nothing to release
        """Release processes and devices."""
