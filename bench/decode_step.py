"""Decode step time of our engine, with and without CUDA graphs, and where a step's GPU time goes.

    python -m bench.decode_step --model /data/dsv2-lite --batches 1,8,32,64
    python -m bench.decode_step --model /tmp/tiny --device cpu --batches 1,2 --steps 4  # smoke

For each batch size B: B requests with random prompts of ``--context`` tokens are prefilled,
then ``--steps`` whole engine steps (schedule, model, sample, detokenize) are timed once every
request decodes; decode throughput is B / step time. ``--profile`` adds a torch.profiler trace of
eager decode steps at the smallest and largest batch, with every kernel's GPU time summed by what
launched it: the MLA attention layers (the MLA decode kernel alone also listed), the MoE layers,
tensor-parallel all-reduces, and the rest (embedding, norms, dense MLP, LM head). Prints tables
and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import random
import statistics
import time
from typing import Any

import torch

from bench.result_file import write_result
from cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from cluster.model.attention import MLAAttention
from cluster.model.moe import MoEBlock

WARM_STEPS = 3
MARGIN = 64  # tokens past the timed steps each request may produce


def _engine(args, graphs: str, max_batch: int) -> LLMEngine:
    longest = max([args.context, *args.prefill_tokens])
    blocks_per_seq = -(-(longest + MARGIN + args.steps) // args.block_size)
    return LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            role="decode",
            tp=args.tp,
            gpus_per_rank=1 if args.tp > 1 else 0,
            decode_graphs=graphs,
            decode_graph_max_batch=max_batch,
            cache=CacheConfig(block_size=args.block_size, num_blocks=max_batch * blocks_per_seq),
            scheduler=SchedulerConfig(
                max_num_seqs=max_batch,
                max_num_batched_tokens=max(8192, args.context),
                max_model_len=longest + MARGIN + args.steps,
            ),
        )
    )


def _fill(engine: LLMEngine, batch: int, args, seed: int) -> None:
    """Add ``batch`` requests and step until every one of them decodes."""
    rng = random.Random(seed)
    # early prompts decode while later ones prefill: no request may finish before the timing
    sampling = SamplingParams(max_tokens=MARGIN + args.steps, temperature=0, ignore_eos=True)
    for _ in range(batch):
        prompt = [rng.randrange(4, engine.vocab_size) for _ in range(args.context)]
        engine.add_request(prompt, sampling)
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(WARM_STEPS):
        engine.step()


def _drain(engine: LLMEngine) -> None:
    for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(r.request_id)
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_used == 0


def _sync(engine: LLMEngine) -> None:
    # a TP group's step returns once rank 0 sampled: its results are host values already
    if getattr(engine.runner, "device", None) is not None and engine.runner.device.type == "cuda":
        torch.cuda.synchronize(engine.runner.device)


def time_steps(engine: LLMEngine, batch: int, args) -> dict[str, float]:
    _fill(engine, batch, args, seed=batch)
    times = []
    for _ in range(args.steps):
        _sync(engine)
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        running = len(engine.scheduler.running)
        assert running == batch, f"{running} of {batch} requests still decode"
    _drain(engine)
    med = statistics.median(times)
    return {"batch": batch, "step_ms": med * 1e3, "p90_ms": sorted(times)[int(0.9 * len(times))]
            * 1e3, "tokens_per_s": batch / med}  # fmt: skip


def time_prefill(engine: LLMEngine, tokens: int) -> dict[str, float]:
    """One prompt of ``tokens`` tokens to its first token (median of three)."""
    rng = random.Random(tokens)
    prompt = [rng.randrange(4, engine.vocab_size) for _ in range(tokens)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.generate([prompt], one)
        times.append(time.perf_counter() - t0)
    return {"tokens": tokens, "ms": statistics.median(times) * 1e3, "first_ms": times[0] * 1e3}


# ===== profile =====


@contextlib.contextmanager
def _labelled(model: torch.nn.Module):
    """Wrap attention and MoE modules, and all-reduces, in profiler ranges."""
    handles, ranges = [], {}

    def pre(name):
        def hook(mod, _):
            r = torch.profiler.record_function(name)
            r.__enter__()
            ranges[id(mod)] = r

        return hook

    def post(mod, _, out):
        ranges.pop(id(mod)).__exit__(None, None, None)

    for m in model.modules():
        name = "pd::attention" if isinstance(m, MLAAttention) else None
        name = "pd::moe" if isinstance(m, MoEBlock) else name
        if name:
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post)]
    import torch.distributed as dist

    real = dist.all_reduce

    def all_reduce(*a, **kw):
        with torch.profiler.record_function("pd::all_reduce"):
            return real(*a, **kw)

    dist.all_reduce = all_reduce
    try:
        yield
    finally:
        dist.all_reduce = real
        for h in handles:
            h.remove()


def _kernel_us(event) -> float:
    """GPU time of the kernels ``event`` and its descendants launched (not their span)."""
    own = sum(k.duration for k in getattr(event, "kernels", []))
    return own + sum(_kernel_us(c) for c in event.cpu_children)


def profile_steps(engine: LLMEngine, batch: int, args) -> dict[str, Any]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _fill(engine, batch, args, seed=1000 + batch)
    steps = 5
    with (
        _labelled(engine.runner.model),
        profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof,
    ):
        for _ in range(steps):
            engine.step()
        _sync(engine)
    _drain(engine)
    parts = {"attention": 0.0, "moe": 0.0, "all_reduce": 0.0}
    for e in prof.events():
        if e.name.startswith("pd::") and e.device_type == DeviceType.CPU:
            parts[e.name[4:]] += _kernel_us(e)
    # the ranges also appear on the GPU timeline as spans: count kernels only
    kernels = [
        e
        for e in prof.key_averages()
        if e.self_device_time_total > 0 and not e.key.startswith("pd::")
    ]
    total = sum(e.self_device_time_total for e in kernels)
    mla = sum(e.self_device_time_total for e in kernels if "_decode_kernel" in e.key
              or "_combine_kernel" in e.key)  # fmt: skip
    out = {k: v / steps / 1e3 for k, v in parts.items()}  # ms per step
    out["rest"] = total / steps / 1e3 - sum(out.values())
    out["gpu_total"] = total / steps / 1e3
    out["mla_decode_kernel"] = mla / steps / 1e3
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
    out["top_kernels"] = {e.key[:80]: e.self_device_time_total / steps / 1e3 for e in top}
    return {"batch": batch, **out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--modes", default="auto,off", help="decode_graphs settings to compare")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one GPU each)")
    p.add_argument("--profile", action="store_true", help="eager steps' GPU time by launcher")
    p.add_argument("--prefill-lens", default="", help="also time one prompt of each length")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.tp > 1:
        if args.profile:
            p.error("--profile traces this process: use --tp 1")
        import ray

        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    args.prefill_tokens = [int(n) for n in args.prefill_lens.split(",") if n]
    result: dict[str, Any] = {
        "model": args.model,
        "tp": args.tp,
        "context": args.context,
        "steps": args.steps,
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
    }
    for mode in args.modes.split(","):
        engine = _engine(args, mode, max(batches))
        result["device"] = engine.runner.device_name
        result["kernels"] = engine.runner.kernel_names
        rows = [time_steps(engine, b, args) for b in batches]
        result[f"graphs_{mode}"] = rows
        print(f"\ndecode_graphs={mode} ({engine.runner.device_name}, context {args.context})")
        print(f"{'batch':>6} {'step ms':>9} {'p90 ms':>9} {'tok/s':>10}")
        for r in rows:
            print(f"{r['batch']:>6} {r['step_ms']:>9.2f} {r['p90_ms']:>9.2f} "
                  f"{r['tokens_per_s']:>10.1f}")  # fmt: skip
        if args.prefill_lens and mode == "off":
            result["prefill"] = [time_prefill(engine, n) for n in args.prefill_tokens]
            for r in result["prefill"]:
                print(
                    f"prefill of {r['tokens']} tokens: {r['ms']:.1f} ms (first {r['first_ms']:.1f})"
                )
        if args.profile and mode == "off":
            prof = [profile_steps(engine, b, args) for b in (batches[0], batches[-1])]
            result["profile_eager"] = prof
            print("\nGPU time per eager decode step (ms), by launcher")
            print(f"{'batch':>6} {'attention':>10} {'(mla kernel)':>13} {'moe':>8} "
                  f"{'all-reduce':>11} {'rest':>8} {'total':>8}")  # fmt: skip
            for r in prof:
                print(f"{r['batch']:>6} {r['attention']:>10.3f} {r['mla_decode_kernel']:>13.3f} "
                      f"{r['moe']:>8.3f} {r['all_reduce']:>11.3f} {r['rest']:>8.3f} "
                      f"{r['gpu_total']:>8.3f}")  # fmt: skip
        engine.runner.shutdown()  # a TP group's rank actors hold their GPUs until then
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_result(result, "decode-step", result["device"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
