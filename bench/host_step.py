"""The host's work per decode step, the model's work taken away: what a step planned ahead must
hide behind the step before it on the device.

    python -P -m pdserve.bench.host_step --model DIR --batches 1,64,128 --contexts 1024,32768

For each batch B and context C: B requests whose C-token prompts arrive as a prefill replica
hands them over (``DecodeEngine.reserve``, ``first_output``, ``adopt``: no prefill runs) decode
on the decode-graph path, uncaptured, through a stand-in model that returns zero logits at
once. ``--steps`` steps run in the serving loop's order with steps planned ahead, each phase
timed (median ms):

- ``plan``: ``Scheduler.schedule_ahead`` (the step's chunks and block tables);
- ``launch``: the graph path's input staging, the stand-in, the sampling queued;
- ``emit``: the step before's text and outputs;
- ``collect``: the tokens to the host, appended, stop checks.

Their sum is the host's share of a step; the device must take longer than that for the host
to stay off the critical path. ``plan after`` times ``schedule`` on the same batch (a step
planned after the tokens, as one that follows a prompt is). The CPU's own speed sets these
figures: the host of a GPU machine differs. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from typing import Any

import torch

from pdserve.bench.result_file import write_result
from pdserve.cluster import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from pdserve.cluster.messages import FirstToken
from pdserve.decode_worker.decode_engine import DecodeEngine

PHASES = ("plan", "launch", "emit", "collect")


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


class _NoModel(torch.nn.Module):
    """The graph path's model, answering at once: zero hidden rows, zero logits."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor, *args: Any) -> torch.Tensor:
        return torch.zeros(ids.shape[0], 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(hidden.shape[0], self.vocab)


def _engine(args, batch: int, context: int) -> DecodeEngine:
    room = 2 * args.steps + 16  # tokens each request decodes (two timed runs), and a margin
    blocks = batch * (-(-(context + room) // args.block_size) + 1)
    blocks += blocks // 50 + 1  # the 1% the scheduler keeps free for running requests
    return DecodeEngine(
        EngineConfig(
            model=args.model,
            device="cpu",
            dtype="float32",
            decode_graphs="eager",
            decode_graph_max_batch=batch,
            cache=CacheConfig(block_size=args.block_size, num_blocks=blocks),
            scheduler=SchedulerConfig(
                max_num_seqs=batch,
                max_num_batched_tokens=max(batch, 256),
                max_model_len=context + room + 1,
            ),
        )  # fmt: skip
    )


def _hand_over(engine: DecodeEngine, batch: int, context: int, steps: int) -> None:
    """``batch`` requests with ``context``-token prompts, their KV taken as arrived."""
    rng = random.Random(context)
    sp = SamplingParams(max_tokens=2 * steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        prompt = [rng.randrange(4, engine.vocab_size) for _ in range(context)]
        blocks = engine.reserve(context)
        engine.adopt(engine.first_output(f"h{i}", prompt, sp, FirstToken(5)), blocks)


def time_phases(args, batch: int, context: int) -> dict[str, Any]:
    engine = _engine(args, batch, context)
    engine.runner.graphs.model = _NoModel(engine.vocab_size)
    _hand_over(engine, batch, context, args.steps)
    pending = engine.collect(engine.launch(engine.plan()))
    launched = engine.launch(engine.plan())
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        sched = engine.plan_ahead(launched)
        t1 = time.perf_counter()
        assert sched is not None and len(sched.chunks) == batch, "every request decodes ahead"
        ahead = engine.launch(sched, after=launched)
        t2 = time.perf_counter()
        engine.emit(pending)
        t3 = time.perf_counter()
        pending = engine.collect(launched)
        t4 = time.perf_counter()
        launched = ahead
        for p, a, b in zip(PHASES, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            times[p].append(b - a)
    engine.emit(pending)
    engine.emit(engine.collect(launched))
    after = []
    for _ in range(args.steps):  # planned after the tokens: schedule, then the step
        t0 = time.perf_counter()
        sched = engine.plan()
        after.append(time.perf_counter() - t0)
        engine.emit(engine.collect(engine.launch(sched)))
    row = {"batch": batch, "context": context}
    row.update({f"{p}_ms": statistics.median(times[p]) * 1e3 for p in PHASES})
    row["host_ms"] = sum(row[f"{p}_ms"] for p in PHASES)
    row["plan_after_ms"] = statistics.median(after) * 1e3
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a checkpoint directory (its tokenizer, config)")
    p.add_argument("--batches", default="1,8,64,128")
    p.add_argument("--contexts", default="1024,32768", help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=20, help="timed steps per point")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = [time_phases(args, b, c) for c in contexts for b in batches]
    cpu = _cpu_name()
    print(f"host work per decode step planned ahead (ms), {cpu}, {torch.get_num_threads()} threads")
    print(f"{'batch':>6} {'context':>8} " + " ".join(f"{p:>8}" for p in PHASES)
          + f" {'host':>8} {'plan after':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['batch']:>6} {r['context']:>8} "
              + " ".join(f"{r[p + '_ms']:>8.3f}" for p in PHASES)
              + f" {r['host_ms']:>8.3f} {r['plan_after_ms']:>11.3f}")  # fmt: skip
    result = {
        "model": args.model,
        "block_size": args.block_size,
        "steps": args.steps,
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    write_result(result, "host-step", "CPU", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
