"""KV through Ray's object store: for CPU clusters and tests, and wherever no GPU link exists.

The prefill replica puts the blocks' raw bytes (a numpy array, so Ray stores it without pickling
and maps it without copying on the same node) and passes the ObjectRef back inside its result;
the decode replica awaits the ref. Ray's reference counting frees the object once decode holds
it, so nothing lingers after a transfer.
"""

from __future__ import annotations

import asyncio
import time

import torch

from pdserve.cluster.executor import Executor
from pdserve.cluster.kv_transport.base import KVTransport, held_nbytes
from pdserve.cluster.messages import KVDestination, KVHandle

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class ObjectStoreTransport(KVTransport):
    name = "object_store"

    async def send(self, executor: Executor, transfer_id: str, dest: KVDestination) -> KVHandle:
        import ray  # here, not at the top: the engine (pdserve.cluster) imports without Ray

        start = time.perf_counter()
        kv = await asyncio.to_thread(executor.take_staged, transfer_id)
        kv = kv.contiguous()
        raw = kv.view(torch.uint8).numpy()  # the bytes of any dtype, Ray-zero-copy
        meta = (str(kv.dtype).removeprefix("torch."), tuple(kv.shape))
        ref = ray.put(raw)
        self.stats.add(raw.nbytes, time.perf_counter() - start)
        return KVHandle(
            transport=self.name,
            transfer_id=transfer_id,
            num_blocks=kv.shape[1],
            nbytes=raw.nbytes,
            payload=(meta, [ref]),  # the ref inside a list: passed along, not resolved by Ray
        )

    async def receive(
        self, handle: KVHandle, dest: KVDestination, executor: Executor, wait_s: float = 60.0
    ) -> None:
        if handle.transport != self.name:
            raise ValueError(f"object-store receiver got a {handle.transport!r} handle")
        if handle.transfer_id != dest.transfer_id:
            raise ValueError(f"KV of transfer {handle.transfer_id}, expected {dest.transfer_id}")
        start = time.perf_counter()
        (dtype, shape), (ref,) = handle.payload
        raw = await ref
        kv = torch.from_numpy(raw.copy()).view(_DTYPES[dtype]).view(shape)
        await asyncio.to_thread(executor.write_kv, dest.block_ids, kv)
        self.stats.add(handle.nbytes, time.perf_counter() - start, held_nbytes(handle, dest))
