"""KV point to point through torch.distributed: NCCL between GPUs (the ``nccl`` transport),
gloo between CPU processes, which is how CI runs the same code.

The decode replica drives both ends. For each of its ranks j it pulls from prefill rank
j mod P: it opens the pair group once (the decode rank listens on a free port, the prefill rank
connects, both through Ray calls), then per transfer hands out the pair's next sequence number
and posts both ends at once: the decode rank's receive and the prefill rank's send. The prefill
replica announces a transfer (``announce``) as soon as it admits the prompt, so decode posts
both ends while the prompt still runs; when it finishes, the prefill rank signals and sends at
once and no Ray call sits between the end of prefill and the bytes moving. Each request moves
as a few layer-group messages per decode rank, from streams of the pair's own, so prefill
steps go on meanwhile.

A transfer, once posted, runs to its end even if the request is cancelled, so the next one on
the pair cannot overtake it. A prompt that failed on the prefill side ends its transfer with
``KVNotSent`` and the pair goes on; a message that fails or outlasts its bound (a peer died)
closes the group on both ends, and the next transfer between the pair opens a new one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict

import torch

from pdserve.cluster.executor import Executor
from pdserve.cluster.kv_transport.base import KVTransport, held_nbytes
from pdserve.cluster.kv_transport.kv_peer import KVNotSent
from pdserve.cluster.kv_transport.peer_client import PeerClient
from pdserve.cluster.messages import KVDestination, KVHandle

log = logging.getLogger(__name__)
_GENERATIONS = itertools.count()  # pair groups of one process get distinct keys
KEPT_PHASES = 1024  # transfers whose phase times wait for ``phases`` at most


class P2PTransport(KVTransport):
    name = "nccl"

    def __init__(self) -> None:
        super().__init__()
        self._locks: dict[str, asyncio.Lock] = {}
        self._open: dict[str, str] = {}  # "prefill peer>decode peer" -> the open group's key
        self._seq: dict[str, int] = {}  # group key -> the next transfer's sequence number
        # transfer id -> the first receiving rank's phase times (``phases``); the oldest go
        self._phases: OrderedDict[str, dict[str, float]] = OrderedDict()

    def phases(self, transfer_id: str) -> dict[str, float] | None:
        return self._phases.pop(transfer_id, None)

    def announce(self, executor: Executor, transfer_id: str, dest: KVDestination) -> KVHandle:
        layers, block_size, width, dtype = executor.kv_layout
        n = dest.num_sent  # decode holds the blocks before first_block
        return KVHandle(
            transport=self.name,
            transfer_id=transfer_id,
            num_blocks=n,
            nbytes=layers * n * block_size * width * getattr(torch, dtype).itemsize,
            payload={"peers": executor.kv_peers(), "shape": (layers, n, block_size, width),
                     "dtype": dtype},
        )  # fmt: skip

    async def send(self, executor: Executor, transfer_id: str, dest: KVDestination) -> KVHandle:
        handle = self.announce(executor, transfer_id, dest)
        self.stats.add(handle.nbytes, 0.0)  # staged; the bytes move when decode pulls them
        return handle

    async def receive(
        self, handle: KVHandle, dest: KVDestination, executor: Executor, wait_s: float = 60.0
    ) -> None:
        if handle.transport != self.name:
            raise ValueError(f"p2p receiver got a {handle.transport!r} handle")
        start = time.perf_counter()
        src: list[PeerClient] = handle.payload["peers"]
        dst = executor.kv_peers()
        serves = [[j for j in range(len(dst)) if j % len(src) == i] for i in range(len(src))]
        fan_out = any(len(js) > 1 for js in serves)

        async def transfer() -> None:
            # a staged copy serving one decode rank is forgotten by its send; one serving
            # several is dropped once all its pulls have ended
            pulls = [
                self._pull(src[i], dst[j], handle, dest.block_ids, not fan_out, wait_s)
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
        saved = held_nbytes(handle, dest) * len(dst)
        self.stats.add(handle.nbytes * len(dst), time.perf_counter() - start, saved)

    async def _pull(
        self,
        src: PeerClient,
        dst: PeerClient,
        handle: KVHandle,
        block_ids: list[int],
        last: bool,
        wait_s: float,
    ) -> None:
        pair = f"{src.peer_id}>{dst.peer_id}"
        tid = handle.transfer_id
        async with self._locks.setdefault(pair, asyncio.Lock()):  # first come, first numbered
            key = self._open.get(pair)
            if key is None:
                key = f"{pair}#{next(_GENERATIONS)}"
                host, port = await dst.call("listen", key)
                await asyncio.gather(src.call("connect", key, host, port), dst.call("accept", key))
                self._open[pair], self._seq[key] = key, 0
            seq = self._seq[key]
            self._seq[key] = seq + 1
            shape, dtype = handle.payload["shape"], handle.payload["dtype"]
            # submitted in sequence order; each end waits for its turn on its own threads
            recv = asyncio.ensure_future(
                dst.call("recv_into", key, seq, tid, shape, dtype, block_ids, wait_s)
            )
            send = asyncio.ensure_future(src.call("send_staged", tid, key, seq, last, wait_s))
        await asyncio.wait([recv, send], return_when=asyncio.FIRST_COMPLETED)
        if not recv.done() and send.exception() is not None:
            if not isinstance(send.exception(), KVNotSent):  # close now: the receive still
                await self._close(pair, key, src, dst)  # waiting wakes instead of timing out
        if not recv.done():  # (a wait on a done future still costs a turn of the loop)
            await asyncio.wait([recv])
        if recv.exception() is None:
            self._phases.setdefault(tid, recv.result())  # the first rank's, with fan-out
            while len(self._phases) > KEPT_PHASES:
                self._phases.popitem(last=False)
            # the KV is in its blocks: the send's own reply (a Ray round trip) is not waited
            # for; should it fail now, the pair is closed for the transfers after this one
            if not send.done():
                asyncio.ensure_future(self._after_send(send, pair, key, src, dst))
            elif send.exception() is not None:
                await self._close(pair, key, src, dst)
            return
        # the receive failed: judge the pair once both ends are back
        done = await asyncio.gather(recv, send, return_exceptions=True)
        failed = [r for r in reversed(done) if isinstance(r, BaseException)]  # the send's first
        broken = [e for e in failed if not isinstance(e, KVNotSent)]
        if broken:
            await self._close(pair, key, src, dst)
        raise (broken or failed)[0]

    async def _after_send(
        self, send: asyncio.Future, pair: str, key: str, src: PeerClient, dst: PeerClient
    ) -> None:
        try:
            await send
        except Exception as e:  # noqa: BLE001 - the KV arrived; the pair is suspect
            log.warning("the send of a delivered transfer on %s failed: %s", key, e)
            await self._close(pair, key, src, dst)

    async def _close(self, pair: str, key: str, src: PeerClient, dst: PeerClient) -> None:
        if self._open.get(pair) == key:
            del self._open[pair]
            self._seq.pop(key, None)
        await asyncio.gather(dst.call("close", key), src.call("close", key), return_exceptions=True)
