"""What the engine drives: one in-process model runner, or a tensor-parallel group of them."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from cluster.sampler import SampledToken
from cluster.scheduler import SchedulerOutput


class Executor(ABC):
    """Runs scheduled steps and owns the KV cache of ``num_blocks`` blocks."""

    num_blocks: int
    kernel_names: dict[str, str]  # op -> backend, for logs and status
    device_name: str

    @abstractmethod
    def execute(self, sched: SchedulerOutput) -> list[SampledToken]:
        """One step; a sampled token per chunk with ``sample`` set, in chunk order."""

    @abstractmethod
    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        """[layers, n, block_size, width]: a copy of the given blocks, in order."""

    @abstractmethod
    def write_kv(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Scatter [layers, n, block_size, width] into the given blocks."""

    def shutdown(self) -> None:  # noqa: B027 - most executors hold nothing to release
        """Release processes and devices."""
