"""Whether one thread's wait for a GPU step holds up another thread's CUDA calls, by how the
waiting thread fetches the step's result. One GPU, one process, two threads:

    python -m pdserve.bench.copy_stall            # a CUDA GPU

- the "engine" thread queues a ~``--step-ms`` step (a GPU sleep and a tiny kernel), then fetches
  a few int64s of it, as a decode engine fetches its sampled tokens: "pageable" copies them into
  pageable memory (``tensor.tolist()``: the driver waits for the step inside the copy), "pinned"
  copies them into pinned memory without blocking and waits on an event, "none" only waits on
  the event (nothing copied);
- the "transfer" thread, on a stream of its own, every 2 ms times four calls a KV receive makes:
  a host-to-device copy from pinned memory, a kernel, an event record, a device-to-device copy.

Each call should take tens of microseconds in every mode; where one takes about the rest of the
engine's step, the engine's way of waiting holds it (a decode replica's KV transfer thread pays
that on every call it makes while a step runs). Prints a table (ms: median / p90 / max per call
and mode) and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from pdserve.bench.result_file import write_result

MODES = ("pageable", "pinned", "none")
CALLS = ("h2d pinned", "kernel", "event record", "d2d copy")


def quantiles(ms: list[float]) -> dict[str, float]:
    """{"median", "p90", "max"} of a list of milliseconds."""
    s = sorted(ms)
    return {"median": statistics.median(s), "p90": s[int(0.9 * len(s))], "max": s[-1]}


def _sleep_cycles(step_ms: float) -> int:
    """``torch.cuda._sleep`` cycles that take about ``step_ms`` on this GPU."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return int(10_000_000 * step_ms / start.elapsed_time(end))


def run_mode(mode: str, cycles: int, samples: int) -> dict[str, dict[str, float]]:
    """The transfer thread's call times (ms) while the engine thread runs steps in ``mode``."""
    dev = torch.device("cuda")
    tokens = torch.zeros(4, dtype=torch.int64, device=dev)
    stop = threading.Event()

    def engine() -> None:
        while not stop.is_set():
            torch.cuda._sleep(cycles)  # the step
            tokens.add_(1)
            if mode == "pageable":
                tokens.tolist()
                continue
            host = tokens.to("cpu", non_blocking=True) if mode == "pinned" else None
            done = torch.cuda.Event()
            done.record()
            done.synchronize()
            if host is not None:
                host.tolist()

    thread = threading.Thread(target=engine)
    thread.start()
    time.sleep(0.1)
    side = torch.cuda.Stream(dev)
    pinned = torch.arange(64, dtype=torch.int64).pin_memory()
    y = torch.zeros(1 << 20, device=dev)
    took: dict[str, list[float]] = {c: [] for c in CALLS}
    try:
        with torch.cuda.stream(side):
            for _ in range(samples):
                time.sleep(0.002)
                t = [time.perf_counter()]
                pinned.to(dev, non_blocking=True)
                t.append(time.perf_counter())
                y.add_(1)
                t.append(time.perf_counter())
                torch.cuda.Event().record()
                t.append(time.perf_counter())
                y[:1024].copy_(y[1024:2048])
                t.append(time.perf_counter())
                for call, a, b in zip(CALLS, t, t[1:]):
                    took[call].append(1e3 * (b - a))
    finally:
        stop.set()
        thread.join()
        torch.cuda.synchronize()
    return {call: quantiles(v) for call, v in took.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.copy_stall", description=__doc__)
    p.add_argument("--step-ms", type=float, default=6.0, help="the engine's step (default 6)")
    p.add_argument("--samples", type=int, default=300, help="timed rounds per mode")
    p.add_argument("--out", help="JSON path (default bench/results/copy-stall-<gpu>.json)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.copy_stall needs a CUDA GPU")
        return 1
    gpu = torch.cuda.get_device_name()
    cycles = _sleep_cycles(args.step_ms)
    modes = {mode: run_mode(mode, cycles, args.samples) for mode in MODES}
    print(f"{gpu}: transfer-thread call ms (median / p90 / max) while the engine thread waits")
    print(f"for a {args.step_ms:g} ms step by:")
    print(f"{'call':<14}" + "".join(f"{m:>24}" for m in MODES))
    for call in CALLS:
        cells = [modes[m][call] for m in MODES]
        print(f"{call:<14}" + "".join(
            f"{c['median']:>8.3f}{c['p90']:>8.3f}{c['max']:>8.3f}" for c in cells))  # fmt: skip
    result = {"gpu": gpu, "step_ms": args.step_ms, "samples": args.samples, "modes": modes}
    write_result(result, "copy-stall", gpu, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
