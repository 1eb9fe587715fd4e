"""One prompt to its first token through a prefill replica's engine, run two ways on one GPU:
in the replica's process, and in a TP=1 rank actor (what a prefill replica runs today with the
NCCL KV transport, so that decode replicas can call its KV peer). The difference is what the
rank actor costs each prompt (a Ray call per step, the step's plan and tokens serialized).

    python -m pdserve.bench.prefill_path --model /tmp/dsv2-lite --tokens 2048,4096,8192
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import time

import ray
import torch

from pdserve.bench.result_file import write_result
from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig


def _engine(args, rank_actor: bool) -> LLMEngine:
    longest = max(args.tokens)
    return LLMEngine(
        EngineConfig(
            model=args.model,
            dtype="bfloat16",
            device=args.device,
            role="prefill",
            rank_actors=rank_actor,
            gpus_per_rank=1 if rank_actor and args.device == "cuda" else 0,
            cache=CacheConfig(  # every prompt computed in full
                block_size=64, num_blocks=2 * (longest // 64 + 2), prefix_caching=False
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=4, max_num_batched_tokens=longest, max_model_len=longest + 64
            ),
        )
    )


def _time(engine: LLMEngine, tokens: int, iters: int) -> list[float]:
    rng = random.Random(tokens)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for i in range(iters + 1):  # the first run of a length is a warm-up
        prompt = [rng.randrange(4, engine.vocab_size) for _ in range(tokens)]
        rid = f"p{tokens}-{i}"
        t0 = time.perf_counter()
        engine.add_request(prompt, one, rid)
        while engine.has_unfinished():
            engine.step()
        if i:
            times.append(time.perf_counter() - t0)
        engine.runner.drop_staged(rid)  # nobody collects the staged KV here
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", default="2048,4096,8192")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="result JSON (default bench/results/prefill-path-<gpu>.json)")
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows: dict[int, dict[str, float]] = {t: {"tokens": t} for t in args.tokens}
    for label, actor in (("in_process_ms", False), ("rank_actor_ms", True)):
        engine = _engine(args, actor)
        for t in args.tokens:
            rows[t][label] = statistics.median(_time(engine, t, args.iters)) * 1e3
        engine.runner.shutdown()
        del engine
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if started:
        ray.shutdown()
    print(f"{'tokens':>7} {'in process ms':>14} {'rank actor ms':>14} {'difference ms':>14}")
    for r in rows.values():
        r["difference_ms"] = r["rank_actor_ms"] - r["in_process_ms"]
        print(f"{r['tokens']:>7} {r['in_process_ms']:>14.2f} {r['rank_actor_ms']:>14.2f} "
              f"{r['difference_ms']:>14.2f}")  # fmt: skip
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    result = {
        "model": args.model,
        "iters": args.iters,
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "device": device,
        "rows": list(rows.values()),
    }
    write_result(result, "prefill-path", device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
