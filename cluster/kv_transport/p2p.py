"""KV point to point through torch.distributed: NCCL between GPUs (the ``nccl`` transport),
gloo between CPU processes, which is how CI runs the same code.

The decode replica drives both ends. For each of its ranks j it pulls from prefill rank
j mod P: it opens the pair group once (the decode rank listens on a free port, the prefill rank
connects, both through Ray calls), then per transfer posts its receive and asks the prefill rank
to send the staged copy. One lock per pair keeps sends and receives in the same order on both
sides, which NCCL needs (it matches messages by order), and a transfer, once started, finishes
even if the request is cancelled, so the next one on that pair cannot overtake it. A message
that fails or outlasts the pair's timeout (a peer died, a staged copy was gone) closes the group
on both ends; the next transfer between the pair opens a new one. Each request
moves as one message per decode rank, [layers, blocks, block_size, width], sent by the rank
actors on threads of their own, so prefill steps go on meanwhile.
"""

from __future__ import annotations

import asyncio
import time

from cluster.executor import Executor
from cluster.kv_transport.base import KVTransport
from cluster.kv_transport.kv_peer import PeerClient
from cluster.messages import KVDestination, KVHandle


class P2PTransport(KVTransport):
    name = "nccl"

    def __init__(self) -> None:
        super().__init__()
        self._locks: dict[str, asyncio.Lock] = {}
        self._open: set[str] = set()

    async def send(self, executor: Executor, transfer_id: str, dest: KVDestination) -> KVHandle:
        layers, block_size, width, dtype = executor.kv_layout
        n = len(dest.block_ids)
        nbytes = layers * n * block_size * width * _itemsize(dtype)
        self.stats.add(nbytes, 0.0)  # staged; the bytes move when decode pulls them
        return KVHandle(
            transport=self.name,
            transfer_id=transfer_id,
            num_blocks=n,
            nbytes=nbytes,
            payload={"peers": executor.kv_peers(), "shape": (layers, n, block_size, width),
                     "dtype": dtype},
        )  # fmt: skip

    async def receive(self, handle: KVHandle, dest: KVDestination, executor: Executor) -> None:
        if handle.transport != self.name:
            raise ValueError(f"p2p receiver got a {handle.transport!r} handle")
        start = time.perf_counter()
        src: list[PeerClient] = handle.payload["peers"]
        dst = executor.kv_peers()
        serves = [[j for j in range(len(dst)) if j % len(src) == i] for i in range(len(src))]
        fan_out = any(len(js) > 1 for js in serves)

        async def transfer() -> None:
            # one round trip per transfer when each staged copy serves one decode rank: the
            # send forgets it; a copy serving several is dropped once all its pulls have ended
            pulls = [
                self._pull(src[i], dst[j], handle, dest.block_ids, last=not fan_out)
                for i, js in enumerate(serves)
                for j in js
            ]
            try:
                await asyncio.gather(*pulls)
            finally:
                used = [src[i] for i, js in enumerate(serves) if js and fan_out]
                await asyncio.gather(*(s.call("drop", handle.transfer_id) for s in used))

        for i, js in enumerate(serves):  # prefill ranks no decode rank pulls from
            if not js:
                asyncio.ensure_future(src[i].call("drop", handle.transfer_id))
        task = asyncio.ensure_future(transfer())
        await asyncio.shield(task)  # cancelled or not, the transfers run to their end
        self.stats.add(handle.nbytes * len(dst), time.perf_counter() - start)

    async def _pull(
        self, src: PeerClient, dst: PeerClient, handle: KVHandle, block_ids: list[int], last: bool
    ) -> None:
        key = f"{src.peer_id}>{dst.peer_id}"
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._open:
                host, port = await dst.call("listen", key)
                await asyncio.gather(src.call("connect", key, host, port), dst.call("accept", key))
                self._open.add(key)
            shape, dtype = handle.payload["shape"], handle.payload["dtype"]
            # both ends return (a message that cannot complete fails within the pair group's
            # timeout) before the pair is judged, so nothing is still using a group we close
            done = await asyncio.gather(
                dst.call("recv_into", key, shape, dtype, block_ids),
                src.call("send_staged", handle.transfer_id, key, last),
                return_exceptions=True,
            )
            failed = [r for r in reversed(done) if isinstance(r, BaseException)]
            if failed:  # the send's error first: a receive that timed out is its consequence
                self._open.discard(key)
                await asyncio.gather(
                    dst.call("close", key), src.call("close", key), return_exceptions=True
                )
                raise failed[0]


def _itemsize(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}[dtype]
