"""KV through Ray's object store: for CPU clusters and tests, and wherever no GPU link exists.

The prefill replica puts the blocks' raw bytes (a numpy array, so Ray stores it without pickling
and maps it without copying on the same node) and passes the ObjectRef back inside its result;
the decode replica awaits the ref. Ray's reference counting frees the object once decode holds
it, so nothing lingers after a transfer.
"""

from __future__ import annotations

import time

import ray
import torch

from cluster.kv_transport.base import KVTransport
from cluster.messages import KVDestination, KVHandle

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class ObjectStoreTransport(KVTransport):
    name = "object_store"

    async def send(self, kv: torch.Tensor, dest: KVDestination) -> KVHandle:
        start = time.perf_counter()
        kv = kv.detach().to("cpu").contiguous()
        raw = kv.view(torch.uint8).numpy()  # the bytes of any dtype, Ray-zero-copy
        meta = (str(kv.dtype).removeprefix("torch."), tuple(kv.shape))
        ref = ray.put(raw)
        nbytes = raw.nbytes
        self.stats.add(nbytes, time.perf_counter() - start)
        return KVHandle(
            transport=self.name,
            transfer_id=dest.transfer_id,
            num_blocks=kv.shape[1],
            nbytes=nbytes,
            payload=(meta, [ref]),  # the ref inside a list: passed along, not resolved by Ray
        )

    async def receive(self, handle: KVHandle, dest: KVDestination) -> torch.Tensor:
        if handle.transport != self.name:
            raise ValueError(f"object-store receiver got a {handle.transport!r} handle")
        if handle.transfer_id != dest.transfer_id:
            raise ValueError(f"KV of transfer {handle.transfer_id}, expected {dest.transfer_id}")
        start = time.perf_counter()
        (dtype, shape), (ref,) = handle.payload
        raw = await ref
        kv = torch.from_numpy(raw.copy()).view(_DTYPES[dtype]).view(shape)
        self.stats.add(handle.nbytes, time.perf_counter() - start)
        return kv
