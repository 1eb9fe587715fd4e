"""KV transfer bandwidth: the p2p transport's effective bandwidth for one prompt's KV against raw
send/recv between the same two processes, measured in the same run.

    python -m pdserve.bench.kv_transfer                      # two GPUs: NCCL
    python -m pdserve.bench.kv_transfer --device cpu --tokens 256,1024   # gloo, a smoke run

Two Ray actors, one GPU each, hold a real paged KV cache (DeepSeek-V2-Lite's layout by default:
27 layers, rows of 512 + 64, blocks of 64 tokens, bf16), as in a 1P1D deployment whose
prefill engine runs in rank actors (TP > 1, or the direct line off): the prefill side is a rank
actor, the decode side a replica process whose KV peer is local. For each prompt
length:
- "raw": send/recv of one contiguous buffer of the same size over a pair group between the same
  two processes, nothing else (the receiver's median);
- "step" (what a request pays when its KV moves after its last prefill step): decode posts
  ``P2PTransport.receive`` as the prefill replica announces the transfer; the prefill rank
  queues a stand-in for the prompt's last step (a GPU sleep of ``--step-ms``) and stages the
  blocks behind it at once, as the engine does; the clock starts when the step ends and stops
  when the receive returns in the decode process (``time.perf_counter`` is one clock for both
  processes of a host), or, for "in blocks", when the decode KV peer's thread has seen the last
  block written (the transport's own end; the rest is the wake-up of the awaiting coroutine);
- "layered" (what the engine does for a KV of several messages): the same step as one sleep per
  layer, with the events ``KVPeer.layer_marks`` asks for, so each layer group is copied and sent
  while the later layers run; same clock. (A sleep does not compete with the copies and NCCL
  for SMs and memory as a model's layers do: the serve benchmark shows that part.)
- "early": from the moment the prefill rank starts staging, with nothing before it on the GPU;
- "after": the receive is started only once the blocks are staged (the Ray calls to both
  ends then sit on the critical path), timed in the decode process.
Every transfer's blocks are checked against what was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time

import ray
import torch

from pdserve.bench.result_file import write_result
from pdserve.cluster.kv_layout import KVFingerprint, block_rows, gather_blocks, scatter_blocks
from pdserve.cluster.kv_transport.kv_peer import WAIT_THREADS, KVPeer, local_peer_id
from pdserve.cluster.kv_transport.p2p import P2PTransport
from pdserve.cluster.kv_transport.pair_group import FIRST_BYTES
from pdserve.cluster.kv_transport.peer_client import PeerClient
from pdserve.cluster.messages import KVDestination

ENDS = (8 << 20, FIRST_BYTES, 64 << 20, 1 << 40)  # first/last message sizes tried; the last: one


class CacheOnlyRunner:
    """A paged KV cache and its block copies: what a KVPeer needs of a model runner."""

    def __init__(self, layers: int, blocks: int, block_size: int, width: int, dtype, device):
        self.device = torch.device(device)
        self.kv_caches = torch.zeros(
            layers, blocks, block_size, width, dtype=dtype, device=self.device
        )
        self.kv_layout = (layers, block_size, width, str(dtype).removeprefix("torch."))

    def read_kv(self, block_ids) -> torch.Tensor:
        return gather_blocks(self.kv_caches, block_rows(self.kv_caches, block_ids), slice(None))

    def write_kv(self, block_ids, kv: torch.Tensor, layers=slice(None)) -> None:
        scatter_blocks(self.kv_caches, block_rows(self.kv_caches, block_ids), kv, layers)


class BenchRank:
    def __init__(self, layers, blocks, block_size, width, dtype: str, device: str) -> None:
        dev = "cuda:0" if device == "cuda" else "cpu"
        self.runner = CacheOnlyRunner(layers, blocks, block_size, width, getattr(torch, dtype), dev)
        self.peer = KVPeer(self.runner)
        self._cycles = 0.0  # torch.cuda._sleep cycles per ms, once measured

    @ray.method(concurrency_group="kv")
    def kv(self, name: str, *args):
        return self.peer.call(name, *args)

    def fill(self, block_ids: list[int], seed: int) -> None:
        g = torch.Generator(device=self.runner.device).manual_seed(seed)
        kv = self.runner.read_kv(block_ids)
        self.runner.write_kv(
            block_ids, torch.randn(kv.shape, generator=g, device=kv.device).to(kv.dtype)
        )

    def checksum(self, block_ids: list[int]) -> float:
        return float(self.runner.read_kv(block_ids).double().sum())

    def stage_timed(self, transfer_id: str, block_ids: list[int]) -> tuple[float, float]:
        """Stage the blocks; (start, copy finished) on this host's perf_counter. (On GPU the
        second can come after a send that started meanwhile: a default-stream sync.)"""
        start = time.perf_counter()
        self.peer.stage(transfer_id, block_ids)
        if self.runner.device.type == "cuda":  # the copy's stream only: a send may be running
            torch.cuda.current_stream().synchronize()
        return start, time.perf_counter()

    def step_then_stage(
        self, transfer_id: str, block_ids: list[int], step_ms: float, layered: bool = False
    ) -> float:
        """As the prefill engine does for a prompt's last step: queue the step (here GPU sleeps
        of about ``step_ms`` in all), stage the blocks behind it at once (so the transfer is
        signalled and decode posts its receive while the step runs), then wait for the step's
        end. ``layered``: the step is one sleep per layer with the events the engine records
        (``KVPeer.layer_marks``), so the KV streams out while the later "layers" run. Returns
        when the step ended (this host's perf_counter, seen by a spinning synchronize)."""
        layers = self.runner.kv_caches.shape[0]
        marks = self.peer.layer_marks([len(block_ids)]) if layered else {}
        if marks:
            for i in range(layers):
                torch.cuda._sleep(int(step_ms / layers * self.cycles_per_ms()))
                if i in marks:
                    marks[i].record()
        else:
            torch.cuda._sleep(int(step_ms * self.cycles_per_ms()))
        end = torch.cuda.Event()
        end.record()
        self.peer.stage(transfer_id, block_ids, marks)
        end.synchronize()
        return time.perf_counter()

    def cycles_per_ms(self) -> float:
        """``torch.cuda._sleep`` cycles per millisecond on this GPU, measured once. (Not a
        ``functools.cached_property``: Python 3.11's holds a lock Ray cannot pickle.)"""
        if self._cycles:
            return self._cycles
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)  # warm
        start.record()
        torch.cuda._sleep(10**7)
        end.record()
        end.synchronize()
        self._cycles = 10**7 / start.elapsed_time(end)
        return self._cycles

    @ray.method(concurrency_group="kv_wait")
    def kv_wait(self, name: str, *args):
        return self.peer.call(name, *args)

    def raw(self, key: str, nbytes: int, iters: int, send: bool) -> list[float]:
        """Seconds per message of ``iters`` raw send (or recv) of one contiguous buffer."""
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.runner.device)
        group = self.peer._groups[key]
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            group.send(buf) if send else group.recv(buf)
            times.append(time.perf_counter() - start)
        return times

    def grouped(
        self, key: str, block_ids: list[int], iters: int, send: bool, first_bytes: int
    ) -> list[float]:
        """Seconds per transfer of ``iters`` of the pair group's own KV path alone: the blocks'
        copy sent in layer groups (``layer_groups`` with ends of ``first_bytes``) and
        scattered into the same blocks at the receiver (no staging, no signal, no turns)."""
        group = self.peer._groups[key]
        group.first_bytes = first_bytes
        kv = self.runner.read_kv(block_ids)  # [slots, n, block_size, width]
        index = torch.tensor(block_ids, device=self.runner.device)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            if send:
                group.send_kv(kv)
            else:
                group.recv_kv(
                    kv.shape, kv.dtype, lambda ls, got: self.runner.write_kv(index, got, ls)
                )
            times.append(time.perf_counter() - start)
        return times


class BenchDecode:
    """The decode replica's process: a KV cache, its local peer, the receiving transport."""

    def __init__(self, layers, blocks, block_size, width, dtype: str, device: str) -> None:
        self.rank = BenchRank(layers, blocks, block_size, width, dtype, device)
        self.kv_layout = (layers, block_size, width, dtype)
        self.transport = P2PTransport()

    def kv_peers(self) -> list[PeerClient]:
        return [PeerClient(local_peer_id(), local=self.rank.peer)]

    async def kv(self, name: str, *args):
        return await self.kv_peers()[0].call(name, *args)

    async def raw(self, key: str, nbytes: int, iters: int) -> list[float]:
        return await asyncio.to_thread(self.rank.raw, key, nbytes, iters, False)

    async def grouped(self, key: str, block_ids: list[int], iters: int, ends: int) -> list[float]:
        return await asyncio.to_thread(self.rank.grouped, key, block_ids, iters, False, ends)

    async def receive(self, handle, dest) -> tuple[float, float]:
        """(when the receive was posted, when it returned), on this host's perf_counter."""
        posted = time.perf_counter()
        await self.transport.receive(handle, dest, self, 60.0)
        return posted, time.perf_counter()

    def fill(self, block_ids: list[int], seed: int) -> None:
        self.rank.fill(block_ids, seed)

    def checksum(self, block_ids: list[int]) -> float:
        return self.rank.checksum(block_ids)


class _Prefill:
    """The slice of an executor the sending transport uses, over one bench rank actor."""

    def __init__(self, actor, layout: tuple[int, int, int, str]) -> None:
        self.actor, self.kv_layout = actor, layout

    def kv_peers(self) -> list[PeerClient]:
        return [PeerClient(self.actor._actor_id.hex(), actor=self.actor)]


async def _traced(rank, tid: str, wait_s: float = 5.0) -> dict[str, float]:
    """Transfer ``tid``'s phases from ``rank``'s KV peer. The sending thread records them once
    its last message is done on its GPU, which can be after the receiver has returned."""
    deadline = time.monotonic() + wait_s
    while True:
        found = dict(await rank.kv.remote("trace")).get(tid)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"the prefill peer recorded no phases for {tid} in {wait_s} s")
        await asyncio.sleep(0.002)


def _phases(send: dict, recv: dict, staged: float, done: float) -> dict[str, float]:
    """Where a posted-early transfer's time goes: ms after ``staged`` (staging started, or the
    step before it ended: then the phases before it are negative)."""
    ms = {
        "prefill copy queued": send["copy queued"],
        "prefill saw it staged": send["staged"],
        "prefill signalled": send["signalled"],
        "decode got the signal": recv["signalled"],
        "decode receive posted": recv["posted recv"],
        "prefill send done": send["sent"],
        "decode blocks written": recv["received"],
        "receive returned": done,
    }
    return {k: (v - staged) * 1e3 for k, v in ms.items()}


async def _run(args) -> dict:
    layout = (args.layers, args.block_size, args.width, args.dtype)
    tokens = [int(t) for t in args.tokens.split(",")]
    blocks = -(-max(tokens) // args.block_size) * 2
    gpus = 1 if args.device == "cuda" else 0
    make = (args.layers, blocks, args.block_size, args.width, args.dtype, args.device)
    groups = {"kv": 4, "kv_wait": WAIT_THREADS}
    pre = ray.remote(num_gpus=gpus, num_cpus=1, concurrency_groups=groups)(BenchRank).remote(*make)
    dec = ray.remote(num_gpus=gpus, num_cpus=1)(BenchDecode).remote(*make)
    prefill = _Prefill(pre, layout)
    sender = P2PTransport()
    # raw baseline: a pair group of its own between the same two processes
    host, port = await dec.kv.remote("listen", "raw")
    await asyncio.gather(
        pre.kv.remote("connect", "raw", host, port), dec.kv.remote("accept", "raw")
    )
    fp = KVFingerprint(
        "bench", "bench", args.dtype, args.block_size, args.layers, args.layers, 0, args.width
    )
    itemsize = getattr(torch, args.dtype).itemsize
    rows = []
    for n in tokens:
        nblocks = -(-n // args.block_size)
        nbytes = args.layers * nblocks * args.block_size * args.width * itemsize
        raw = await asyncio.gather(
            pre.raw.remote("raw", nbytes, args.iters + 1, True),
            dec.raw.remote("raw", nbytes, args.iters + 1),
        )
        raw_s = statistics.median(raw[1][1:])  # receiver's view; the first message warms up
        grouped = {}  # the pair group's KV path alone, by message size
        for ends in ENDS:
            took = await asyncio.gather(
                pre.grouped.remote("raw", list(range(nblocks)), args.iters + 1, True, ends),
                dec.grouped.remote("raw", list(range(nblocks)), args.iters + 1, ends),
            )
            label = "one message" if ends >= 1 << 40 else f"ends {ends >> 20} MB"
            grouped[label] = statistics.median(took[1][1:])
        kinds = (
            ("step", "layered", "early", "after") if args.device == "cuda" else ("early", "after")
        )
        took: dict[str, list[float]] = {k: [] for k in kinds}
        phases: dict[str, list[dict[str, float]]] = {"step": [], "layered": [], "early": []}
        for it in range(len(kinds) * (args.iters + 1)):
            kind = kinds[it % len(kinds)]
            src = list(range(nblocks))
            dst = list(range(blocks - 1, blocks - 1 - nblocks, -1))  # other blocks, reversed
            await pre.fill.remote(src, seed=it)
            tid = f"{n}-{it}"
            dest = KVDestination(
                transfer_id=tid,
                decode_replica="bench",
                num_blocks=nblocks,
                fingerprint=fp,
                block_ids=dst,
            )
            handle = sender.announce(prefill, tid, dest)
            if kind == "after":
                await pre.stage_timed.remote(tid, src)
                start, done = await dec.receive.remote(handle, dest)
            else:
                receiving = dec.receive.remote(handle, dest)
                await asyncio.sleep(0.05)  # posted and waiting, as while a prompt runs
                if kind in ("step", "layered"):
                    layered = kind == "layered"
                    start = await pre.step_then_stage.remote(tid, src, args.step_ms, layered)
                else:
                    start, _ = await pre.stage_timed.remote(tid, src)
                _, done = await receiving
                if it >= len(kinds):
                    sent_at, got_at = await asyncio.gather(
                        _traced(pre, tid), dec.kv.remote("trace")
                    )
                    phases[kind].append(_phases(sent_at, dict(got_at)[tid], start, done))
            sent, got = await asyncio.gather(pre.checksum.remote(src), dec.checksum.remote(dst))
            if sent != got:
                raise RuntimeError(f"{n} tokens: received blocks differ from the sent ones")
            if it >= len(kinds):  # the first of each kind warms up
                took[kind].append(done - start)
        row = {"tokens": n, "bytes": nbytes, "raw_s": raw_s, "raw_gbps": nbytes / raw_s / 1e9}
        for kind in kinds:
            sec = statistics.median(took[kind])
            row[f"{kind}_s"], row[f"{kind}_gbps"] = sec, nbytes / sec / 1e9
            row[f"{kind}_pct_of_raw"] = 100 * raw_s / sec
            if kind in phases:
                row[f"{kind}_phases_ms"] = {
                    k: statistics.median(p[k] for p in phases[kind]) for k in phases[kind][0]
                }
            if kind in ("step", "layered"):
                sec = row[f"{kind}_phases_ms"]["decode blocks written"] / 1e3
                row[f"{kind}_in_blocks_s"] = sec
                row[f"{kind}_in_blocks_pct_of_raw"] = 100 * raw_s / sec
        row["grouped_s"] = grouped
        row["grouped_pct_of_raw"] = {k: 100 * raw_s / v for k, v in grouped.items()}
        rows.append(row)
    return {"config": vars(args), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.kv_transfer", description=__doc__)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tokens", default="1024,4096,8192,16384,32768")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--step-ms", type=float, default=5.0, help="the stand-in last prefill step")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not ray.is_initialized():
        ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    result = asyncio.run(_run(args))
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.node() + "-cpu"
    result["device"], result["date"] = gpu, time.strftime("%Y-%m-%d")
    layout = f"{args.layers} layers x {args.width} x {args.dtype}, blocks of {args.block_size}"
    print(f"KV transfer on {gpu}: {layout}")
    kinds = [
        k
        for k in ("step", "step_in_blocks", "layered", "layered_in_blocks", "early", "after")
        if f"{k}_s" in result["rows"][0]
    ]
    heads = [k.replace("_in_blocks", " in") + " ms" for k in kinds]
    print(f"{'tokens':>7} {'MB':>8} {'raw ms':>8} {'raw GB/s':>9}"
          + "".join(f" {h:>11} {'% raw':>6}" for h in heads))  # fmt: skip
    for r in result["rows"]:
        print(f"{r['tokens']:>7} {r['bytes'] / 1e6:>8.1f} {r['raw_s'] * 1e3:>8.3f} "
              f"{r['raw_gbps']:>9.1f}" + "".join(
                  f" {r[k + '_s'] * 1e3:>11.3f} {r[k + '_pct_of_raw']:>6.1f}" for k in kinds
              ))  # fmt: skip
    print("\nthe pair group's KV path alone (layer-group messages, scattered into blocks): "
          "ms and % of raw, by message size")  # fmt: skip
    for r in result["rows"]:
        cells = ", ".join(f"{k} {v * 1e3:.3f} ms ({r['grouped_pct_of_raw'][k]:.0f}%)"
                          for k, v in r["grouped_s"].items())  # fmt: skip
        print(f"{r['tokens']:>7}: {cells}")
    origins = (
        ("step", "the step ended"),
        ("layered", "the step ended"),
        ("early", "staging started"),
    )
    for kind, origin in origins:
        if f"{kind}_phases_ms" not in result["rows"][0]:
            continue
        print(f"\n{kind}: ms after {origin} (median)")
        for r in result["rows"]:
            steps = ", ".join(f"{k} {v:.3f}" for k, v in r[f"{kind}_phases_ms"].items())
            print(f"{r['tokens']:>7}: {steps}")
    write_result(result, "kv-transfer", gpu, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
