"""Tensor parallelism inside one replica: this rank's place and its collectives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """Rank ``rank`` of ``size``; ``group`` is the torch.distributed group (None when size is 1).
    ``comm``: a ``NcclComm`` over the same ranks (GPU), which the collectives use when set: it
    can be captured into a CUDA graph, torch.distributed's NCCL group cannot."""

    rank: int = 0
    size: int = 1
    group: Any = None
    comm: Any = None

    @property
    def graph_safe(self) -> bool:
        return self.size == 1 or self.comm is not None

    def split(self, n: int, what: str) -> int:
        """This rank's share of a dimension of ``n`` that must split evenly."""
        if n % self.size:
            raise ValueError(f"{what} = {n} does not split over tensor-parallel size {self.size}")
        return n // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        if self.comm is None:
            dist.all_reduce(x, group=self.group)
        elif x.is_contiguous():
            self.comm.all_reduce(x)
        else:
            x.copy_(self.comm.all_reduce(x.contiguous()))
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., n * size], rank order."""
        if self.size == 1:
            return x
        if self.comm is not None:
            parts = self.comm.all_gather(x.unsqueeze(0))  # [size, ..., n]
            return torch.cat(parts.unbind(0), dim=-1)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()
