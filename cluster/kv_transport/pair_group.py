"""A two-rank torch.distributed group between one prefill rank (rank 0) and one decode rank
(rank 1), outside any default process group: NCCL between GPUs, gloo between CPU processes.

The decode side hosts the group's TCPStore on a port the OS picks and passes the address to the
prefill side through a Ray call, so no port is fixed in advance. NCCL matches point-to-point
messages by order, not by tag: whoever uses a group must issue sends and receives in the same
order on both sides (the KV peers take turns by sequence number for that).

Beside the group, a signal line (``signal_line.py``, its port passed through the store) carries
one word per transfer, prefill to decode: "ok" (the KV follows on the group) or why it will not
come. A decode rank waits on the word, not on a posted NCCL receive, so a transfer can wait long
before its prefill ends without an NCCL timeout, and a prefill that fails costs its pair nothing.
A request's KV moves in a few layer-group messages; the receiver posts them all at once and
scatters each into its blocks on a side stream while the next one arrives. A one-element
message when the group is made connects NCCL then, off the first transfer's path.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from pdserve.cluster.kv_transport.signal_line import SignalLine
from pdserve.cluster.kv_transport.watchdog import Watchdog

log = logging.getLogger(__name__)

PREFILL, DECODE = 0, 1
FIRST_BYTES = 16 << 20  # a KV's first and last messages: about this size (``layer_groups``)
GROWTH = 4  # and each group at most this many times the one nearer the end
_ASYNC_ERRORS = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


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
        self.timeout_s = timeout_s
        prefixed = dist.PrefixStore(f"kv/{key}", store)
        self._store = store  # the group keeps using it
        timeout = timedelta(seconds=timeout_s)
        if rank == DECODE:
            server = SignalLine.listen(store.host)
            store.set(f"sigport/{key}", str(server.getsockname()[1]))
        if device.type == "cuda":
            # a pair's failed message must fail that transfer, not the replica: NCCL's watchdog
            # then aborts the pair's communicator instead of ending the process (its default).
            # Read when a group is made: set for this one only.
            saved = os.environ.get(_ASYNC_ERRORS)
            os.environ[_ASYNC_ERRORS] = "2"
            try:
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                # the group's NCCL stream outranks the model's steps and the block copies: a
                # message's kernel gets SMs as soon as one frees, not after queued copies
                options.is_high_priority_stream = True
                self.pg = dist.ProcessGroupNCCL(prefixed, rank, 2, options)
            finally:
                if saved is None:
                    os.environ.pop(_ASYNC_ERRORS, None)
                else:
                    os.environ[_ASYNC_ERRORS] = saved
        else:
            self.pg = dist.ProcessGroupGloo(prefixed, rank, 2, timeout)
        if rank == DECODE:  # gloo groups have met by now; NCCL ones meet at the first message
            self._line = SignalLine.accept(server, timeout_s)
        else:
            port = int(store.get(f"sigport/{key}"))
            self._line = SignalLine.connect(store.host, port, timeout_s)
        self.first_bytes = FIRST_BYTES  # both ends must cut messages the same way
        cuda = device.type == "cuda"
        self._io = torch.cuda.Stream(device) if cuda else None  # KV messages
        self._side = torch.cuda.Stream(device) if cuda else None  # scattering received parts
        self._watchdog = Watchdog(self.abort, f"kv-watch-{key}") if cuda else None
        self._handshake()

    def _handshake(self) -> None:
        """One tiny message, prefill to decode. NCCL makes a pair's communicator at its first
        message (hundreds of ms): here that happens while the prompt whose transfer opened the
        pair still runs, not when its KV is due."""
        t = torch.zeros(1, device=self.device)
        with self._on_io():
            work = (
                self.pg.send([t], DECODE, 0)
                if self.rank == PREFILL
                else self.pg.recv([t], PREFILL, 0)
            )
            work.wait()
            self._finish(self._io)

    @staticmethod
    def connect(
        host: str, port: int, key: str, device: torch.device, timeout_s: float
    ) -> PairGroup:
        """The prefill side: join the group the decode side listens for."""
        store = dist.TCPStore(host, port, 2, is_master=False, timeout=timedelta(seconds=timeout_s))
        return PairGroup(store, key, PREFILL, device, timeout_s)

    def send(self, t: torch.Tensor) -> None:
        """One message; blocks until it is handed over (for NCCL: until the copy finished)."""
        assert self.rank == PREFILL
        self.pg.send([t.contiguous()], DECODE, 0).wait()
        self._sync(t)

    def recv(self, t: torch.Tensor) -> None:
        """Blocks until ``t`` holds the next message."""
        assert self.rank == DECODE and t.is_contiguous()
        self.pg.recv([t], PREFILL, 0).wait()
        self._sync(t)

    def send_kv(
        self, kv: torch.Tensor, ready: Sequence[tuple[slice, torch.cuda.Event]] = ()
    ) -> None:
        """[slots, n, block_size, width], contiguous, as ``layer_groups`` messages, from a
        stream of the group's own. ``ready``: (layers, event) of the copies that made ``kv``, in
        layer order; each message waits for the copies of its layers, not for later ones nor
        for the model steps queued after them."""
        assert self.rank == PREFILL and kv.is_contiguous()
        with self._on_io():
            works, waited = [], 0
            for layers in layer_groups(kv.shape[0], kv.nbytes, self.first_bytes):
                while waited < len(ready) and ready[waited][0].start < layers.stop:
                    self._io.wait_event(ready[waited][1])
                    waited += 1
                works.append(self.pg.send([kv[layers]], DECODE, 0))
            # posted back to back. With NCCL a wait only orders the io stream, and one peer's
            # messages run in order on one NCCL stream: after the last is after them all
            for work in works if self._io is None else works[-1:]:
                work.wait()
            self._finish(self._io)

    def recv_kv(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        write: Callable[[slice, torch.Tensor], None],
        gpu_times: bool = False,
    ) -> dict[str, float]:
        """Receive what ``send_kv`` sent, handing each layer group to ``write(layers, part)``
        (part: [len(layers), n, block_size, width]); returns once every part is written. On GPU
        all receives are posted at once from the group's own stream (not behind the decode
        steps on the default one), then each part's ``write`` is queued on a side stream behind
        that part's receive only, so group g is scattered while group g + 1 is on the wire and
        only the last (small) group's scatter follows the last byte. Returns phase times
        (``time.perf_counter``): "posted recv", the first receive posted, and "queued",
        everything queued; with ``gpu_times`` (GPU only; timing events cost a little) also when
        the GPU had the last part in ("gpu in") and all parts written ("gpu written"), placed
        on the host clock from an event recorded just before the first receive (a stream that
        is idle reaches an event when the host queues it)."""
        assert self.rank == DECODE
        t: dict[str, float] = {}
        timed = gpu_times and self._io is not None
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if timed else []
        with self._on_io():
            buf = torch.empty(shape, dtype=dtype, device=self.device)  # [slots, n, bs, width]
            groups = layer_groups(buf.shape[0], buf.nbytes, self.first_bytes)
            if self._io is None:  # gloo: each wait blocks (once: a second one hangs)
                for layers in groups:
                    work = self.pg.recv([buf[layers]], PREFILL, 0)
                    t.setdefault("posted recv", time.perf_counter())
                    work.wait()
                    write(layers, buf[layers])
                t["queued"] = time.perf_counter()
                return t
            if marks:
                zero = time.perf_counter()
                marks[0].record(self._io)
            works = []
            for layers in groups:
                works.append(self.pg.recv([buf[layers]], PREFILL, 0))
                t.setdefault("posted recv", time.perf_counter())
            with torch.cuda.stream(self._side):
                for g, (layers, work) in enumerate(zip(groups, works)):
                    work.wait()  # the side stream waits for this part, not the later ones
                    if marks and g == len(groups) - 1:
                        marks[1].record(self._side)
                    write(layers, buf[layers])
                if marks:
                    marks[2].record(self._side)
            t["queued"] = time.perf_counter()
            self._finish(self._side)
        for name, mark in zip(("gpu in", "gpu written"), marks[1:]):
            t[name] = zero + marks[0].elapsed_time(mark) / 1e3
        return t

    def _finish(self, stream: torch.cuda.Stream | None) -> None:
        """Wait for ``stream``'s work (the messages and what follows them) in this thread,
        without holding the GIL: a synchronize on an event (the driver spins, Python does not:
        a Python poll loop kept the engine thread of the same process off the GIL for up to a
        switch interval; a waiter thread cost two thread wake-ups per transfer). The group's
        watchdog aborts the communicator once the wait outlasts the group's timeout (a peer
        died mid-message; its kernels then exit and the synchronize returns); then raise."""
        if stream is None:
            return
        done = torch.cuda.Event()
        done.record(stream)
        self._watchdog.arm(self.timeout_s)
        try:
            done.synchronize()
        finally:
            expired = self._watchdog.disarm()
        if expired:
            raise TimeoutError(f"KV message on pair {self.key} not done in {self.timeout_s:.0f}s")

    def _on_io(self):
        return torch.cuda.stream(self._io) if self._io is not None else contextlib.nullcontext()

    # ---- the per-transfer signal ----

    def signal(self, transfer_id: str, value: str) -> None:
        """Prefill side: "ok" when the KV follows, else why it will not."""
        self._line.send(transfer_id, value)

    def await_signal(self, transfer_id: str, timeout_s: float) -> str:
        """Decode side: the transfer's signal ("closed" once the group is closed);
        ``TimeoutError`` when none came in time."""
        return self._line.receive(transfer_id, timeout_s)

    def _sync(self, t: torch.Tensor) -> None:
        # NCCL's wait() only orders the current stream after the transfer; the caller needs the
        # bytes to have moved (to free the sender's copy, or to scatter the receiver's)
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()

    def abort(self) -> None:
        """End the communicator now, messages in flight included (NCCL kernels then exit)."""
        try:
            self.pg.abort()
        except (AttributeError, RuntimeError) as e:  # gloo groups have no abort
            log.warning("could not abort pair group %s: %s", self.key, e)

    def close(self) -> None:
        """End the group; a thread waiting for a signal wakes with "closed"."""
        self._line.shut()
        if self._watchdog is not None:
            self._watchdog.stop()
        try:
            self.pg.shutdown()
        except (AttributeError, RuntimeError):  # gloo groups and older torch have no shutdown
            pass


def layer_groups(layers: int, nbytes: int, first_bytes: int | None = None) -> list[slice]:
    """Contiguous layer ranges, small at both ends and large in the middle; both ends of a
    pair cut the same way. A transfer's first message waits only for its own copy and its last
    scatter is all that follows the last byte, so the ends are about ``first_bytes`` (at least
    a layer); sizes grow by ``GROWTH`` toward the middle, so each group's copy is done while
    the group before it is on the wire (a block copy runs about 5x faster than NCCL between
    two H200s), and the middle is cut no finer than that needs: few messages (each costs
    ~15 us). A KV of ``layers`` layers and ``nbytes`` bytes under twice ``first_bytes`` is one
    message."""
    first_bytes = FIRST_BYTES if first_bytes is None else first_bytes
    per_layer = nbytes / max(layers, 1)
    ramp: list[int] = []  # group sizes in layers from the first one in
    size = max(1, math.ceil(first_bytes / max(per_layer, 1)))
    while 2 * (sum(ramp) + size) <= layers:
        ramp.append(size)
        size *= GROWTH
    middle = layers - 2 * sum(ramp)
    cuts = math.ceil(middle / (GROWTH * ramp[-1])) if ramp else 1
    sizes = ramp + [middle * (i + 1) // cuts - middle * i // cuts for i in range(cuts)]
    sizes += ramp[::-1]
    bounds = [0, *itertools.accumulate(s for s in sizes if s)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]
