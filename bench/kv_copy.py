"""The pieces of a KV transfer, one by one, on two GPUs: copying a prompt's blocks out of and into
a paged cache (by kernel), and moving the bytes over NCCL (by message shape).

    python -m pdserve.bench.kv_copy                       # two GPUs
    python -m pdserve.bench.kv_copy --device cpu --tokens 1024   # gloo, a smoke run

The cache is DeepSeek-V2-Lite's layout by default ([layers, blocks, block_size, width]: 27
layers, rows of 512 + 64, blocks of 64 tokens, bf16). The blocks of a prompt are scattered
(every other block, reversed), as a cache that has served a while holds them.

- copy: milliseconds to gather a prompt's blocks into one buffer and to scatter them back, by
  kernel: ``index_select`` / ``index_copy_`` along the block dimension (what the transport used
  first), the same along the first dimension of a [layers * blocks, block_size * width] view
  (whole 73 KB rows per index), and ``copy_rows`` (the Triton row copy the transport uses now);
- nccl: milliseconds (receiver's view, host clock, after a sync) to move the same bytes as one
  message, as the transport's layer groups (``layer_groups``) posted one by one, and as one
  message per layer posted one by one and coalesced into one NCCL group.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pdserve.bench.result_file import write_result
from pdserve.cluster.kv_layout import block_rows, gather_blocks, scatter_blocks
from pdserve.cluster.kv_transport.pair_group import layer_groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, iters: int) -> float:
    """Median seconds of ``fn()`` (after one warm-up call), synchronized on both sides."""
    times = []
    for i in range(iters + 1):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_rows(cache: torch.Tensor, tokens: int, iters: int) -> dict[str, float]:
    layers, blocks, bs, width = cache.shape
    n = -(-tokens // bs)
    ids = torch.arange(blocks - 1, blocks - 1 - 2 * n, -2, device=cache.device)  # scattered
    flat = cache.view(layers * blocks, bs * width)
    rows = block_rows(cache, ids)  # [layers, n]
    out = cache.index_select(1, ids)  # [layers, n, bs, width]
    every, dev = slice(None), cache.device
    idx, src = rows.reshape(-1), out.view(-1, bs * width)
    return {  # "copy_rows": the transport's own gather_blocks / scatter_blocks
        "gather index_select(1)": _time(lambda: cache.index_select(1, ids), dev, iters),
        "gather flat index_select(0)": _time(lambda: flat.index_select(0, idx), dev, iters),
        "gather flat copy_rows": _time(lambda: gather_blocks(cache, rows, every), dev, iters),
        "scatter index_copy_(1)": _time(lambda: cache.index_copy_(1, ids, out), dev, iters),
        "scatter flat index_copy_(0)": _time(lambda: flat.index_copy_(0, idx, src), dev, iters),
        "scatter flat copy_rows": _time(
            lambda: scatter_blocks(cache, rows, out, every), dev, iters
        ),
        "scatter flat index_put_": _time(
            lambda: flat.index_put_((rows.reshape(-1),), out.view(-1, bs * width)), dev, iters
        ),
        "plain copy (same bytes)": _time(lambda: out.clone(), dev, iters),
    }


def _messages(pg, buf: torch.Tensor, parts: list[slice], send: bool, coalesce: bool) -> None:
    peer = 1 if send else 0
    if coalesce:
        ops = [
            dist.P2POp(dist.isend if send else dist.irecv, buf[p], peer, group=pg) for p in parts
        ]
        works = dist.batch_isend_irecv(ops)
    else:
        works = [(pg.send if send else pg.recv)([buf[p]], peer, 0) for p in parts]
    for w in works:
        w.wait()


def _worker(rank: int, args, port: int, queue) -> None:
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=60))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=2)
    pg = dist.group.WORLD
    dtype = getattr(torch, args.dtype)
    tokens = [int(t) for t in args.tokens.split(",")]
    blocks = -(-max(tokens) // args.block_size) * 2 + 2
    cache = torch.randn(args.layers, blocks, args.block_size, args.width, device=device).to(dtype)
    rows = []
    for t in tokens:
        n = -(-t // args.block_size)
        buf = torch.empty(args.layers, n, args.block_size, args.width, dtype=dtype, device=device)
        row = {"tokens": t, "bytes": buf.numel() * buf.element_size()}
        if rank == 1:
            row["copy_s"] = copy_rows(cache, t, args.iters)
        shapes = {
            "one message": [slice(None)],
            "layer groups (the transport's)": layer_groups(buf.shape[0], buf.nbytes),
            "per layer": [slice(i, i + 1) for i in range(args.layers)],
        }
        nccl = {}
        for name, parts in shapes.items():
            for coalesce in (False, True) if len(parts) > 1 else (False,):
                label = name + (", coalesced" if coalesce else "")
                dist.barrier()
                nccl[label] = _time(
                    lambda p=parts, c=coalesce, b=buf: _messages(pg, b, p, rank == 0, c),
                    device,
                    args.iters,
                )
        row["nccl_s"] = nccl
        rows.append(row)
    if rank == 1:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.kv_copy", description=__doc__)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tokens", default="1024,8192,32768")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=9)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit("bench.kv_copy needs two GPUs (or --device cpu)")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_worker, args=(r, args, port, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    rows = queue.get(timeout=600)
    for proc in procs:
        proc.join()
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.node() + "-cpu"
    result = {"config": vars(args), "rows": rows, "device": gpu, "date": time.strftime("%Y-%m-%d")}
    print(f"KV copies and messages on {gpu}: {args.layers} layers x {args.width} x {args.dtype}")
    for r in rows:
        print(f"\n{r['tokens']} tokens, {r['bytes'] / 1e6:.1f} MB")
        for kind in ("copy_s", "nccl_s"):
            for k, v in r[kind].items():
                print(f"  {k:<36} {v * 1e3:8.3f} ms {r['bytes'] / v / 1e9:8.1f} GB/s")
    write_result(result, "kv-copy", gpu, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
