"""Steps that carry a prefill chunk (mixed steps): eager, replayed from a graph, and as served.

    python -m pdserve.bench.mixed_step --model /data/dsv2-lite --batches 0,8,64 --chunks 16,256,2048
    python -m pdserve.bench.mixed_step --model /tmp/tiny --device cpu --batches 0,2 --chunks 8

For each decode batch B (requests of ``--context`` tokens that decode) and chunk length P, a
colocated engine plans a step of B decode rows and one new prompt of P tokens, and this bench
runs that step's model forward and LM head:

- ``eager``: over the step's own tensors, launched kernel by kernel (as every such step ran
  before mixed-step graphs; synchronized before and after);
- ``replay``: the same forward captured once into a CUDA graph by this bench and replayed, its
  GPU time alone: the least any graph of that step could take;
- ``served``: the engine's own path for the step (``ModelRunner.compute_logits``): the mixed-step
  graph of its bucket (``bucket``: decode rows and tokens it is padded to) where one fits and
  start-up kept it, with the host's staging, else eager;
- ``step``: the whole engine step (inputs, forward, sampling, outputs), once.

``eager`` less ``replay`` is the host's launch work the GPU waits for. A forward this bench
cannot capture records why. On CPU only ``eager``, ``served`` and ``step`` are timed.
``--host-profile N`` lists the host's N busiest functions in an eager forward (cProfile).
Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import platform
import pstats
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pdserve.bench.decode_step import (
    _drain,
    _engine,
    _fill,
    _sync,
    kernel_overrides,
    replay_ms,
)
from pdserve.bench.result_file import write_result
from pdserve.cluster import LLMEngine, SamplingParams
from pdserve.cluster.batch_inputs import BatchInputs


def _forward(engine: LLMEngine, inputs: BatchInputs):
    """The step's forward and LM head over ``inputs``: [N, vocab] logits of its sampled rows."""
    runner = engine.runner
    hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta)
    return runner.model.compute_logits(hidden[inputs.sample_rows])


def _median_ms(engine: LLMEngine, fn, reps: int) -> float:
    """Median ms of ``reps`` calls of ``fn``, each synchronized before and after."""
    times = []
    for _ in range(reps):
        _sync(engine)
        t0 = time.perf_counter()
        fn()
        _sync(engine)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _host_profile(engine: LLMEngine, inputs: BatchInputs, reps: int, top: int) -> list[dict]:
    """The host's time in ``reps`` eager forwards by function (cProfile), per forward: the
    ``top`` functions by their own time, with their calls and cumulative time."""
    prof = cProfile.Profile()
    _sync(engine)
    prof.enable()
    for _ in range(reps):
        _forward(engine, inputs)
    _sync(engine)
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, prim, tottime, cumtime, _)
    rows = [
        {
            "function": f"{name} ({Path(file).name}:{line})",
            "calls": calls / reps,
            "own_ms": own * 1e3 / reps,
            "cum_ms": cum * 1e3 / reps,
        }
        for (file, line, name), (_, calls, own, cum, _) in stats.items()
    ]
    return sorted(rows, key=lambda r: -r["own_ms"])[:top]


def _replay_ms(engine: LLMEngine, inputs: BatchInputs, reps: int) -> tuple[float | None, str]:
    """GPU ms of one replay of the step's forward captured in a graph, or None and why not.
    The forward writes the same KV to the same slots on every run: replays change nothing."""
    if engine.runner.device.type != "cuda":
        return None, "no CUDA device"
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            _forward(engine, inputs)
    except Exception as e:  # a host sync or a host copy inside the forward
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return replay_ms(graph, reps), ""


def time_mixed(
    engine: LLMEngine, batch: int, chunk: int, reps: int, seed: int, profile: int = 0
) -> dict[str, Any]:
    """One mixed step of ``batch`` decode rows and a new prompt of ``chunk`` tokens; with
    ``profile``, that many of the host's busiest functions in its eager forward."""
    rng = random.Random(seed)
    prompt = [rng.randrange(4, engine.vocab_size) for _ in range(chunk)]
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    sched = engine.plan()
    shape = [len(c.token_ids) for c in sched.chunks]
    if shape != [1] * batch + [chunk]:
        raise ValueError(
            f"the planned step is not {batch} decode rows and one chunk of {chunk} tokens: "
            f"{len(shape)} chunks, {sum(shape)} tokens (raise --step-tokens)"
        )
    runner = engine.runner
    inputs = BatchInputs.of(sched, runner.block_size, runner.device, runner.groups.window)
    runner.plan_eager(sched)  # for the eager forwards and the replay below (FlashInfer's MLA)
    _forward(engine, inputs)  # the first run compiles what it meets
    eager = _median_ms(engine, lambda: _forward(engine, inputs), reps)
    hosts = _host_profile(engine, inputs, reps, profile) if profile else None
    replay, why = _replay_ms(engine, inputs, reps)
    mixed = runner.mixed
    bucket = mixed.bucket(sched) if mixed is not None else None
    runner.compute_logits(sched)  # the bucket's first run, when not captured
    served = _median_ms(engine, lambda: runner.compute_logits(sched), reps)
    _sync(engine)
    t0 = time.perf_counter()
    engine.emit(engine.collect(engine.launch(sched)))
    step = (time.perf_counter() - t0) * 1e3
    row = {"batch": batch, "chunk": chunk, "eager_ms": eager, "replay_ms": replay,
           "served_ms": served, "bucket": bucket,
           "step_ms": step}  # fmt: skip
    if replay is not None:
        row["saved_ms"] = eager - replay
        row["eager_over_replay"] = eager / replay
    if why:
        row["not_captured"] = why
    if hosts is not None:
        row["host_profile"] = hosts
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument(
        "--random-weights", type=int, default=None, help="draw weights with this seed at load"
    )
    p.add_argument("--batches", default="0,8,64", help="decode rows beside the chunk")
    p.add_argument("--chunks", default="16,64,256,1024,2048", help="prefill chunk lengths")
    p.add_argument("--context", type=int, default=1024, help="prompt tokens of each decode row")
    p.add_argument("--reps", type=int, default=5, help="timed runs of each forward")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--mixed-max-tokens", type=int, default=2048, help="the engine's mixed_graph_max_tokens"
    )
    p.add_argument(
        "--host-profile", type=int, default=0, help="list the host's N busiest functions"
    )
    p.add_argument("--kernels", default="", help="op=backend overrides, comma separated")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.kernel_overrides = kernel_overrides(p, args.kernels)
    batches = [int(b) for b in args.batches.split(",")]
    chunks = [int(n) for n in args.chunks.split(",")]
    if min(batches) < 0 or min(chunks) < 2:
        p.error(f"--batches must be >= 0 and --chunks >= 2, got {args.batches!r}, {args.chunks!r}")
    # the step's budget holds the largest batch and chunk; the decode_step helpers read these
    args.step_tokens = max(batches) + max(chunks)
    args.prefill_tokens = chunks
    args.steps = len(chunks)  # each chunk's step advances the decode rows by one token
    args.tp = 1
    # the decode rows and the new prompt, colocated: steps with prefill chunks as served
    engine = _engine(
        args, "auto", max(batches) + 1, "colocated", mixed_graph_max_tokens=args.mixed_max_tokens
    )
    runner = engine.runner
    result: dict[str, Any] = {
        "model": args.model,
        "context": args.context,
        "reps": args.reps,
        "device": runner.device_name,
        "kernels": runner.kernel_names,
        "kernel_overrides": args.kernel_overrides,
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "rows": [],
    }
    for b in batches:
        if b:
            _fill(engine, b, args, seed=b)
        for n in chunks:
            row = time_mixed(engine, b, n, args.reps, 1000 * b + n, args.host_profile)
            result["rows"].append(row)
        _drain(engine)
    print(f"\nmixed steps ({runner.device_name}, context {args.context}): forward + LM head, ms")
    print(f"{'batch':>6} {'chunk':>6} {'eager':>9} {'replay':>9} {'saved':>9} {'eager/replay':>13} "
          f"{'served':>9} {'bucket':>11} {'step':>9}")  # fmt: skip
    for r in result["rows"]:
        replay = "-" if r["replay_ms"] is None else f"{r['replay_ms']:.3f}"
        saved = f"{r['saved_ms']:.3f}" if "saved_ms" in r else "-"
        ratio = f"{r['eager_over_replay']:.2f}x" if "eager_over_replay" in r else "-"
        bucket = "eager" if r["bucket"] is None else "x".join(map(str, r["bucket"]))
        print(f"{r['batch']:>6} {r['chunk']:>6} {r['eager_ms']:>9.3f} {replay:>9} {saved:>9} "
              f"{ratio:>13} {r['served_ms']:>9.3f} {bucket:>11} {r['step_ms']:>9.3f}  "
              f"{r.get('not_captured', '')}")  # fmt: skip
    mixed = runner.mixed
    result["mixed_graphs"] = None if mixed is None else mixed.describe()
    if mixed is not None and mixed.graphs:
        result["mixed_capture_s"], result["mixed_capture_mib"] = mixed.capture_s, mixed.capture_mib
        print(f"\nmixed-step graphs: {len(mixed.graphs)} captured and timed in "
              f"{mixed.capture_s:.1f} s, {mixed.capture_mib:.0f} MiB reserved")  # fmt: skip
    for r in result["rows"]:
        if "host_profile" in r:
            print(f"\nhost, batch {r['batch']} chunk {r['chunk']}: own ms / cumulative ms / calls "
                  "per eager forward")  # fmt: skip
            for f in r["host_profile"]:
                print(f"  {f['own_ms']:8.3f} {f['cum_ms']:8.3f} {f['calls']:7.0f}  {f['function']}")
    runner.shutdown()
    del engine
    gc.collect()
    write_result(result, "mixed-step", result["device"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
