"""KV transfer bandwidth: the p2p transport's effective bandwidth for one prompt's KV against raw
send/recv between the same two processes, measured in the same run.

    python -m bench.kv_transfer                      # two GPUs: NCCL
    python -m bench.kv_transfer --device cpu --tokens 256,1024   # gloo, a smoke run

Two Ray actors, one GPU each, hold a real paged KV cache (DeepSeek-V2-Lite's layout by default:
27 layers, rows of 512 + 64, blocks of 64 tokens, bf16). For each prompt length the "transport"
figure times what a request pays: stage the prompt's blocks on the prefill side, then the decode
side's ``P2PTransport.receive`` (Ray calls to both ranks, one message, scatter into blocks). The
"raw" figure times send/recv of one contiguous buffer of the same size over a pair group between
the same actors, nothing else. Every transfer's blocks are checked against what was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time

import ray
import torch

from bench.result_file import write_result
from cluster.kv_layout import KVFingerprint
from cluster.kv_transport.kv_peer import KVPeer, PeerClient
from cluster.kv_transport.p2p import P2PTransport
from cluster.messages import KVDestination


class CacheOnlyRunner:
    """A paged KV cache and its block copies: what a KVPeer needs of a model runner."""

    def __init__(self, layers: int, blocks: int, block_size: int, width: int, dtype, device):
        self.device = torch.device(device)
        self.kv_caches = torch.zeros(
            layers, blocks, block_size, width, dtype=dtype, device=self.device
        )

    def read_kv(self, block_ids: list[int]) -> torch.Tensor:
        return self.kv_caches.index_select(1, torch.tensor(block_ids, device=self.device))

    def write_kv(self, block_ids: list[int], kv: torch.Tensor) -> None:
        self.kv_caches.index_copy_(1, torch.tensor(block_ids, device=self.device), kv)


class BenchRank:
    def __init__(self, layers, blocks, block_size, width, dtype: str, device: str) -> None:
        dev = "cuda:0" if device == "cuda" else "cpu"
        self.runner = CacheOnlyRunner(layers, blocks, block_size, width, getattr(torch, dtype), dev)
        self.peer = KVPeer(self.runner)

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


class _Side:
    """The slice of an executor the transport uses, over one bench rank actor."""

    def __init__(self, actor, layout: tuple[int, int, int, str]) -> None:
        self.actor, self.kv_layout = actor, layout

    def kv_peers(self) -> list[PeerClient]:
        return [PeerClient(self.actor._actor_id.hex(), actor=self.actor)]


async def _run(args) -> dict:
    layout = (args.layers, args.block_size, args.width, args.dtype)
    tokens = [int(t) for t in args.tokens.split(",")]
    blocks = -(-max(tokens) // args.block_size) * 2
    gpus = 1 if args.device == "cuda" else 0
    actor = ray.remote(num_gpus=gpus, num_cpus=1, max_concurrency=8)(BenchRank)
    make = (args.layers, blocks, args.block_size, args.width, args.dtype, args.device)
    pre, dec = actor.remote(*make), actor.remote(*make)
    prefill, decode = _Side(pre, layout), _Side(dec, layout)
    sender, receiver = P2PTransport(), P2PTransport()
    # raw baseline: a pair group of its own between the same two actors
    host, port = await dec.kv.remote("listen", "raw")
    await asyncio.gather(
        pre.kv.remote("connect", "raw", host, port), dec.kv.remote("accept", "raw")
    )
    fp = KVFingerprint("bench", "bench", args.dtype, args.block_size, args.layers, args.width, 1)
    itemsize = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    rows = []
    for n in tokens:
        nblocks = -(-n // args.block_size)
        nbytes = args.layers * nblocks * args.block_size * args.width * itemsize
        raw = await asyncio.gather(
            pre.raw.remote("raw", nbytes, args.iters + 1, True),
            dec.raw.remote("raw", nbytes, args.iters + 1, False),
        )
        raw_s = statistics.median(raw[1][1:])  # receiver's view; the first message warms up
        moved, staged = [], []
        for it in range(args.iters + 1):
            src = list(range(nblocks))
            dst = list(range(blocks - 1, blocks - 1 - nblocks, -1))  # other blocks, reversed
            await pre.fill.remote(src, seed=it)
            tid = f"{n}-{it}"
            t0 = time.perf_counter()
            await pre.kv.remote("stage", tid, src)
            t1 = time.perf_counter()
            dest = KVDestination(
                transfer_id=tid, decode_replica="bench", block_ids=dst, fingerprint=fp
            )
            handle = await sender.send(prefill, tid, dest)
            await receiver.receive(handle, dest, decode)
            t2 = time.perf_counter()
            sent, got = await asyncio.gather(pre.checksum.remote(src), dec.checksum.remote(dst))
            if sent != got:
                raise RuntimeError(f"{n} tokens: received blocks differ from the sent ones")
            if it:
                staged.append(t2 - t0)
                moved.append(t2 - t1)
        t_s, s_s = statistics.median(moved), statistics.median(staged)
        rows.append({
            "tokens": n, "bytes": nbytes, "raw_s": raw_s, "transport_s": t_s, "with_stage_s": s_s,
            "raw_gbps": nbytes / raw_s / 1e9, "transport_gbps": nbytes / t_s / 1e9,
            "with_stage_gbps": nbytes / s_s / 1e9, "pct_of_raw": 100 * raw_s / t_s,
        })  # fmt: skip
    return {"config": vars(args), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv_transfer", description=__doc__)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tokens", default="1024,4096,8192,16384,32768")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not ray.is_initialized():
        ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    result = asyncio.run(_run(args))
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.node() + "-cpu"
    result["device"], result["date"] = gpu, time.strftime("%Y-%m-%d")
    layout = f"{args.layers} layers x {args.width} x {args.dtype}, blocks of {args.block_size}"
    print(f"KV transfer on {gpu}: {layout}")
    row = "{:>7} {:>8} {:>9} {:>15} {:>6} {:>12}"
    print(row.format("tokens", "MB", "raw GB/s", "transport GB/s", "% raw", "+stage GB/s"))
    for r in result["rows"]:
        print(row.format(r["tokens"], f"{r['bytes'] / 1e6:.1f}", f"{r['raw_gbps']:.1f}",
                         f"{r['transport_gbps']:.1f}", f"{r['pct_of_raw']:.1f}",
                         f"{r['with_stage_gbps']:.1f}"))  # fmt: skip
    write_result(result, "kv-transfer", gpu, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
