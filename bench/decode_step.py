"""Decode step time of our engine, with and without CUDA graphs, and where a step's GPU time goes.

    python -m pdserve.bench.decode_step --model /data/dsv2-lite --batches 1,8,32,64
    python -m pdserve.bench.decode_step --model /tmp/tiny --device cpu --batches 1,2 --steps 4

For each batch size B: B requests with random prompts of ``--context`` tokens are prefilled,
then ``--steps`` whole engine steps (schedule, model, sample, detokenize) are timed once every
request decodes: one after another (``step``), in the serving loop's overlapped order (step n's
outputs made while step n + 1 runs: ``overlap``), and in that order with steps planned ahead
(step n + 1 planned and launched before step n's tokens are back, where step n replays a graph:
``ahead``, with the share of steps so launched); decode throughput is B / step time.
``--profile`` adds a torch.profiler trace of eager decode steps at the smallest and largest
batch, with every kernel's GPU time summed by the labelled range it ran in on the GPU timeline:
the attention layers (MLA or GQA; their decode kernel alone also listed), the MoE layers,
tensor-parallel all-reduces, and the rest (embedding, norms, dense MLP, LM head, sampling).
With captured graphs, ``replay ms`` is one graph replay's GPU time alone: step ms less replay ms
is the host's share of a step.
Prints tables and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import time
from typing import Any

import torch

from pdserve.bench import step_floor, step_profile
from pdserve.bench.mla_decode_tiles import numbers
from pdserve.bench.result_file import write_result
from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from pdserve.cluster.config import ModelConfig
from pdserve.cluster.kv_groups import KVGroups
from pdserve.kernels import mla_decode_flashinfer, triton_configs

WARM_STEPS = 3
MARGIN = 64  # tokens past the timed steps each request may produce


def _chunk(args) -> int:
    """The step's token budget (max_num_batched_tokens): ``--step-tokens``, and at least one
    whole prompt."""
    return max(args.step_tokens, args.context)


def _produce(args, batch: int) -> int:
    """Tokens each request may produce: the timed steps of the three orders (step, overlap,
    ahead) and a margin, and one per step of the fill, where early prompts decode while later
    ones prefill (each prompt over at most two steps, as the decode rows take part of the
    budget)."""
    return MARGIN + 3 * args.steps + 2 * -(-batch * args.context // _chunk(args))


def set_mla_tiles(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--mla-tiles`` as this process's Triton MLA decode tiles for every device and head count;
    a usage error for anything but four positive integers."""
    if len(args.mla_tiles) != 4 or min(args.mla_tiles) < 1:
        p.error(f"--mla-tiles {args.mla_tiles} must be four positive BLOCK_H,BLOCK_N,warps,stages")
    bh, bn, warps, stages = args.mla_tiles
    if args.tp > 1:
        p.error("--mla-tiles sets this process's tables: use --tp 1")
    cfg = dict(BLOCK_H=bh, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    triton_configs.MLA_DECODE = {"default": {1 << 30: cfg}}


def kernel_overrides(p: argparse.ArgumentParser, text: str) -> dict[str, str]:
    """``--kernels`` (op=backend pairs separated by commas) as a dict; a usage error else."""
    try:
        return dict(kv.split("=", 1) for kv in text.split(",") if kv)
    except ValueError:
        p.error(f"--kernels takes op=backend pairs separated by commas, got {text!r}")


def _engine(args, graphs: str, max_batch: int, role: str = "decode", **kw) -> LLMEngine:
    """The engine the timings run (``kw``: more EngineConfig fields)."""
    longest = max([args.context, *args.prefill_tokens])
    chunk = _chunk(args)
    tail = _produce(args, max_batch)
    groups = KVGroups.of(ModelConfig.from_dir(args.model))  # sliding layers: their window too
    blocks_per_seq = groups.most_blocks(longest + tail, chunk, args.block_size)
    return LLMEngine(
        EngineConfig(
            model=args.model,
            random_weights_seed=args.random_weights,
            dtype=args.dtype,
            device=args.device,
            role=role,
            tp=args.tp,
            gpus_per_rank=1 if args.tp > 1 else 0,
            decode_graphs=graphs,
            decode_graph_max_batch=max_batch,
            warmup_steps=False,  # the steps timed here are run before their timing
            kernel_overrides=args.kernel_overrides,
            # every prompt computed in full: the prefill timings repeat one prompt
            cache=CacheConfig(
                block_size=args.block_size,
                num_blocks=max_batch * blocks_per_seq,
                prefix_caching=False,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_batch,
                max_num_batched_tokens=chunk,
                max_model_len=longest + tail,
            ),
            **kw,
        )
    )


def _fill(engine: LLMEngine, batch: int, args, seed: int) -> None:
    """Add ``batch`` requests and step until every one of them decodes."""
    rng = random.Random(seed)
    # early prompts decode while later ones prefill: no request may finish before the timing
    sampling = SamplingParams(max_tokens=_produce(args, batch), temperature=0, ignore_eos=True)
    for _ in range(batch):
        prompt = [rng.randrange(4, engine.vocab_size) for _ in range(args.context)]
        engine.add_request(prompt, sampling)
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(WARM_STEPS):
        engine.step()
    _settle(engine)


def _settle(engine: LLMEngine) -> None:
    """Collect a step left launched ahead, so that the next timing starts from an idle engine."""
    launched = engine.take_ahead()
    if launched is not None:
        engine.emit(engine.collect(launched))


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
        engine.emit(engine.collect(engine.launch(engine.plan())))  # planned after the tokens
        times.append(time.perf_counter() - t0)
        running = len(engine.scheduler.running)
        assert running == batch, f"{running} of {batch} requests still decode"
    overlapped, _ = _loop_steps(engine, args.steps, ahead=False)
    ahead, share = _loop_steps(engine, args.steps, ahead=True)
    assert len(engine.scheduler.running) == batch
    replay = _replay_ms(engine, batch, args.steps)
    floor = _floor(engine, args.copy_GBps)
    _drain(engine)
    med = statistics.median(times)
    row = {"batch": batch, "step_ms": med * 1e3, "p90_ms": sorted(times)[int(0.9 * len(times))]
           * 1e3, "tokens_per_s": batch / med, "overlap_ms": overlapped * 1e3,
           "overlap_tokens_per_s": batch / overlapped, "ahead_ms": ahead * 1e3,
           "ahead_tokens_per_s": batch / ahead, "ahead_share": share,
           "replay_ms": replay}  # fmt: skip
    row.update(floor)
    if floor:
        row["step_over_floor"] = row["step_ms"] / floor["floor_ms"]
    return row


def _floor(engine: LLMEngine, copy_gbps: float) -> dict[str, Any]:
    """The step's floor (``step_floor``): bytes it must read, at the run's copy bandwidth. An
    in-process engine only (a TP group's model lives in its rank actors)."""
    if not hasattr(engine.runner, "model"):
        return {}
    b = step_floor.step_bytes(engine)
    return {
        "floor_ms": b.total / copy_gbps / 1e6,
        "weight_bytes": b.weights,
        "expert_bytes": b.experts,
        "kv_bytes": b.kv,
        "experts_hit": list(b.experts_hit),
    }


def _loop_steps(engine: LLMEngine, steps: int, ahead: bool) -> tuple[float, float]:
    """Seconds per step of the serving loop's order (``AsyncEngine``): step n + 1 launched
    (taken from ``launch_ahead`` where ``ahead`` launched it, else planned now), step n's
    outputs emitted while it runs, step n + 1 collected; timed over ``steps`` steps. And the
    share of them that were launched ahead."""
    pending = engine.collect(engine.launch(engine.plan()))
    _sync(engine)
    early = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        launched = engine.take_ahead()
        early += launched is not None
        if launched is None:
            launched = engine.launch(engine.plan())
        if ahead:
            engine.launch_ahead(launched)
        engine.emit(pending)
        pending = engine.collect(launched)
    took = (time.perf_counter() - t0) / steps
    engine.emit(pending)
    _settle(engine)
    return took, early / steps


def _replay_ms(engine: LLMEngine, batch: int, steps: int) -> float | None:
    """GPU time of the captured graph of ``batch``'s bucket replayed back to back (over the
    last step's inputs): a step's time less this is host work a loop that overlapped the next
    step's preparation with this step's GPU work could hide. None without captured graphs."""
    graphs = getattr(engine.runner, "graphs", None)
    if graphs is None or not graphs.graphs:
        return None
    return replay_ms(graphs.graphs[graphs.bucket(batch)], steps)


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """GPU ms of one replay of ``graph``: ``reps`` back to back after one untimed."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def time_prefill(engine: LLMEngine, tokens: int, tflops: float) -> dict[str, float]:
    """One prompt of ``tokens`` tokens to its first token (median of three), and its FLOP rate
    against ``tflops``, the run's matmul ceiling (in-process engines)."""
    rng = random.Random(tokens)
    prompt = [rng.randrange(4, engine.vocab_size) for _ in range(tokens)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.generate([prompt], one)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    row = {"tokens": tokens, "ms": med * 1e3, "first_ms": times[0] * 1e3,
           "tokens_per_s": tokens / med}  # fmt: skip
    if hasattr(engine.runner, "model"):
        flops = step_floor.prefill_flops(engine.model_config, engine.runner.model, tokens)
        row["TFLOPs"] = flops / med / 1e12
        row["pct_matmul"] = 100 * row["TFLOPs"] / tflops
    return row


def profile_steps(engine: LLMEngine, batch: int, args) -> dict[str, Any]:
    _fill(engine, batch, args, seed=1000 + batch)
    out = step_profile.profile(engine)
    _drain(engine)
    return {"batch": batch, **out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument(
        "--random-weights",
        type=int,
        default=None,
        metavar="SEED",
        help="draw the weights at load from SEED (a make-model --config-only dir)",
    )
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument(
        "--step-tokens", type=int, default=8192, help="a step's token budget (prefills chunk)"
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--modes", default="auto,off", help="decode_graphs settings to compare")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one GPU each)")
    p.add_argument("--profile", action="store_true", help="eager steps' GPU time by launcher")
    p.add_argument("--prefill-lens", default="", help="also time one prompt of each length")
    p.add_argument(
        "--kernels", default="", help="kernel overrides, e.g. rms_norm=triton,rope=triton"
    )
    p.add_argument(
        "--mla-triton-rows",
        type=int,
        default=None,
        metavar="N",
        help="FlashInfer's MLA decode hands steps of up to N decode rows to the Triton kernel "
        "(0: none; default: its TRITON_ROWS table)",
    )
    p.add_argument(
        "--mla-tiles",
        type=numbers(int),
        default=(),
        metavar="H,N,W,S",
        help="the Triton MLA decode's tiles for every head count and batch (BLOCK_H, BLOCK_N, "
        "warps, stages; default: its tables)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.mla_tiles:
        set_mla_tiles(p, args)
    args.kernel_overrides = kernel_overrides(p, args.kernels)
    if args.mla_triton_rows is not None:  # every head count: this process's engines only
        if args.tp > 1:
            p.error("--mla-triton-rows sets this process's table: use --tp 1")
        mla_decode_flashinfer.TRITON_ROWS = {1 << 20: args.mla_triton_rows}
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    if args.profile and "off" not in modes:
        p.error(f"--profile traces eager steps: add off to --modes (got {args.modes!r})")
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
        "kernel_overrides": args.kernel_overrides,
        "mla_triton_rows": {str(k): v for k, v in mla_decode_flashinfer.TRITON_ROWS.items()},
        "mla_tiles": args.mla_tiles or "its tables",
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
    }
    device = EngineConfig(model=args.model, device=args.device).resolve_device()
    args.copy_GBps = step_floor.copy_bandwidth(device)
    args.matmul_TFLOPs = step_floor.matmul_tflops(device)
    result["ceilings"] = {"copy_GBps": args.copy_GBps, "matmul_TFLOPs": args.matmul_TFLOPs}
    print(f"ceilings: copy {args.copy_GBps:.0f} GB/s, bf16 matmul {args.matmul_TFLOPs:.1f} TFLOP/s")
    for mode in modes:
        engine = _engine(args, mode, max(batches))
        result["device"] = engine.runner.device_name
        result["kernels"] = engine.runner.kernel_names
        rows = [time_steps(engine, b, args) for b in batches]
        result[f"graphs_{mode}"] = rows
        print(f"\ndecode_graphs={mode} ({engine.runner.device_name}, context {args.context})")
        print(f"{'batch':>6} {'step ms':>9} {'p90 ms':>9} {'tok/s':>10} {'overlap ms':>11} "
              f"{'tok/s':>10} {'ahead ms':>9} {'tok/s':>10} {'ahead':>6} {'replay ms':>10} "
              f"{'floor ms':>9} {'step/floor':>11}")  # fmt: skip
        for r in rows:
            replay = "-" if r["replay_ms"] is None else f"{r['replay_ms']:.2f}"
            floor = (
                f"{r['floor_ms']:>9.3f} {r['step_over_floor']:>10.1f}x" if r.get("floor_ms") else ""
            )
            print(f"{r['batch']:>6} {r['step_ms']:>9.2f} {r['p90_ms']:>9.2f} "
                  f"{r['tokens_per_s']:>10.1f} {r['overlap_ms']:>11.2f} "
                  f"{r['overlap_tokens_per_s']:>10.1f} {r['ahead_ms']:>9.2f} "
                  f"{r['ahead_tokens_per_s']:>10.1f} {r['ahead_share']:>6.0%} {replay:>10} "
                  f"{floor}")  # fmt: skip
        if args.prefill_tokens and mode == modes[0]:  # a prompt's steps run eagerly in every mode
            result["prefill"] = [
                time_prefill(engine, n, args.matmul_TFLOPs) for n in args.prefill_tokens
            ]
            for r in result["prefill"]:
                rate = (
                    f", {r['TFLOPs']:.2f} TFLOP/s = {r['pct_matmul']:.1f}% of matmul"
                    if "TFLOPs" in r
                    else ""
                )
                print(f"prefill of {r['tokens']} tokens: {r['ms']:.1f} ms (first "
                      f"{r['first_ms']:.1f}), {r['tokens_per_s']:.0f} tok/s{rate}")  # fmt: skip
        if args.profile and mode == "off":
            prof = [profile_steps(engine, b, args) for b in (batches[0], batches[-1])]
            result["profile_eager"] = prof
            print("\nGPU time per eager decode step (ms), by launcher")
            print(f"{'batch':>6} {'attention':>10} {'(its kernel)':>13} {'moe':>8} "
                  f"{'all-reduce':>11} {'rest':>8} {'total':>8}")  # fmt: skip
            for r in prof:
                print(f"{r['batch']:>6} {r['attention']:>10.3f} "
                      f"{r['attention_decode_kernel']:>13.3f} "
                      f"{r['moe']:>8.3f} {r['all_reduce']:>11.3f} {r['rest']:>8.3f} "
                      f"{r['gpu_total']:>8.3f}")  # fmt: skip
            for r in prof:
                print(
                    f"batch {r['batch']}: {r['kernels']} kernels per step "
                    f"({r['kernels_by_part']}); most time: "
                    + ", ".join(f"{n[:40]} {t:.3f}" for n, t in list(r["top_kernels"].items())[:5])
                )
        engine.runner.shutdown()  # a TP group's rank actors hold their GPUs until then
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_result(result, "decode-step", result["device"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
