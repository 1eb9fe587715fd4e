"""A two-rank torch.distributed group between one prefill rank (rank 0) and one decode rank
(rank 1), outside any default process group: NCCL between GPUs, gloo between CPU processes.

The decode side hosts the group's TCPStore on a port the OS picks and passes the address to the
prefill side through a Ray call, so no port is fixed in advance. NCCL matches point-to-point
messages by order, not by tag: whoever uses a group must issue sends and receives in the same
order on both sides (the NCCL transport holds a lock per group for that).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

PREFILL, DECODE = 0, 1


def listen(host: str, timeout_s: float) -> dist.TCPStore:
    """The decode side's store for one new group, on a free port (``store.port``)."""
    return dist.TCPStore(
        host, 0, 2, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )


class PairGroup:
    def __init__(
        self,
        store: dist.Store,
        key: str,
        rank: int,
        device: torch.device,
        timeout_s: float = 60.0,
    ) -> None:
        """Join group ``key`` as ``rank`` (PREFILL or DECODE). With gloo this blocks until the
        other side joins; NCCL connects at the first message. A message that does not complete
        within ``timeout_s`` fails instead of hanging (a peer died)."""
        self.key, self.rank, self.device = key, rank, device
        prefixed = dist.PrefixStore(f"kv/{key}", store)
        self._store = store  # the group keeps using it
        timeout = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            # a pair's failed message must fail that transfer, not the replica: on a timeout
            # NCCL's watchdog then aborts the pair's communicator instead of ending the process
            # (its default). Read when a group is made; tensor-parallel groups, made earlier,
            # keep the default. Not yet exercised on GPUs by a test.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, 2, options)
        else:
            self.pg = dist.ProcessGroupGloo(prefixed, rank, 2, timeout)
        self.messages = 0

    @staticmethod
    def connect(
        host: str, port: int, key: str, device: torch.device, timeout_s: float
    ) -> PairGroup:
        """The prefill side: join the group the decode side listens for."""
        store = dist.TCPStore(host, port, 2, is_master=False, timeout=timedelta(seconds=timeout_s))
        return PairGroup(store, key, PREFILL, device, timeout_s)

    def send(self, t: torch.Tensor) -> None:
        """Blocks until the message is handed over (for NCCL: until the copy finished)."""
        assert self.rank == PREFILL
        self.pg.send([t.contiguous()], DECODE, 0).wait()
        self._sync(t)
        self.messages += 1

    def recv(self, t: torch.Tensor) -> None:
        """Blocks until ``t`` holds the next message."""
        assert self.rank == DECODE and t.is_contiguous()
        self.pg.recv([t], PREFILL, 0).wait()
        self._sync(t)
        self.messages += 1

    def _sync(self, t: torch.Tensor) -> None:
        # NCCL's wait() only orders the current stream after the transfer; the caller needs the
        # bytes to have moved (to free the sender's copy, or to scatter the receiver's)
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except (AttributeError, RuntimeError):  # gloo groups and older torch have no shutdown
            pass
