"""The ``pdserve`` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time


def _make_model(args: argparse.Namespace) -> int:
    from pdserve.cluster.checkpoint_maker import make_model

    start = time.perf_counter()
    out = make_model(
        args.out,
        args.preset,
        mxfp4=args.mxfp4,
        fp8=args.fp8,
        dtype=args.dtype,
        seed=args.seed,
        weights=not args.config_only,
    )
    what = "config and tokenizer" if args.config_only else "checkpoint"
    print(f"wrote {args.preset} {what} to {out} in {time.perf_counter() - start:.1f}s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pdserve.cluster import (
        CacheConfig,
        EngineConfig,
        LLMEngine,
        SamplingParams,
        SchedulerConfig,
    )

    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        cache=CacheConfig(block_size=args.block_size),
        scheduler=SchedulerConfig(max_model_len=args.max_model_len),
    )
    engine = LLMEngine(config)
    sampling = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    prompts = args.prompts
    if args.chat:
        prompts = [
            engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts
        ]
    start = time.perf_counter()
    outputs = engine.generate(prompts, sampling)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(args.prompts, outputs):
        print(f"--- {prompt!r} -> {out.num_output_tokens} tokens ({out.finish_reason})")
        print(out.text)
        if args.show_ids:
            print(out.token_ids)
    n = sum(o.num_output_tokens for o in outputs)
    print(f"--- {n} tokens in {elapsed:.2f}s ({n / elapsed:.1f} tok/s)")
    return 0


def _up(args: argparse.Namespace) -> int:
    from pdserve.deploy import local_head, serve_app

    if args.config:
        app_args, http = serve_app.load_config(args.config)
    else:
        app_args, http = {"model": {"preset": "tiny"}, "prefill": {}, "decode": {}}, {}
    model = app_args.setdefault("model", {})
    if args.model:
        model["path"] = args.model
        model.pop("preset", None) if not args.config else None
    if args.dtype:
        model["dtype"] = args.dtype
    ingress = app_args.setdefault("ingress", {})
    if args.port:
        ingress["port"] = http["port"] = args.port
    http.setdefault("host", ingress.get("host", "127.0.0.1"))
    http.setdefault("port", ingress.get("port", 8000))
    started = False
    try:
        started = local_head.connect(args.address)
        _trap_sigterm()
        if started:
            print("started a local Ray head (`pdserve down` stops it)")
        name = serve_app.deploy(app_args, http)
        print(f"deploying {name} ...")
        serve_app.wait_running(name)
        url = f"http://{http['host']}:{http['port']}"
        serve_app.wait_healthy(url)
    except BaseException as e:
        _undo_up(started, app_args.get("name", "pdserve"))
        if isinstance(e, KeyboardInterrupt):
            print("pdserve up: interrupted", file=sys.stderr)
            return 130
        raise
    mode = "colocated" if app_args.get("prefill", {}) is None else "prefill/decode"
    print(f"{name} is up ({mode}): {url}/v1  (health {url}/health, metrics {url}/metrics)")
    return 0


def _undo_up(started: bool, name: str) -> None:
    """An ``up`` that did not finish stops the head it started; on a cluster it joined, it
    says what it may have left."""
    import ray

    from pdserve.deploy import local_head

    record = local_head.HeadRecord.read() if started else None
    joined = ray.is_initialized() and record is None
    ray.shutdown()
    if record is not None:
        local_head.stop(record)
        print("stopped the Ray head this `pdserve up` started", file=sys.stderr)
    elif joined:
        print(f"{name!r} may be partly deployed; `pdserve down` removes it", file=sys.stderr)


def _status(args: argparse.Namespace) -> int:
    from ray import serve

    from pdserve.deploy import local_head, serve_app

    local_head.connect_existing(args.address)
    _trap_sigterm()
    app = serve.status().applications.get(args.name)
    if app is None:
        raise ValueError(f"no application named {args.name!r} is deployed")
    print(f"{args.name}: {getattr(app.status, 'value', app.status)}")
    stats = sorted(serve_app.replica_stats(args.name), key=lambda s: (s.pool, s.replica_id))
    row = "{:8} {:28} {:20} {:>2} {:>4} {:>4} {:>14}"
    print(row.format("pool", "replica", "device", "tp", "run", "wait", "KV used/total"))
    for s in stats:
        kv = f"{s.kv_blocks_used}/{s.kv_blocks_total}"
        print(row.format(s.pool, s.replica_id[:28], s.device[:20], s.tp, s.running, s.waiting, kv))
    for pool in ("prefill", "decode"):
        first = next((s for s in stats if s.pool == pool), None)
        if first is not None:
            moved = sum(s.kv_bytes for s in stats if s.pool == pool)
            print(
                f"{pool} kernels: {first.kernels}; KV transport {first.kv_transport}, {moved} bytes"
            )
    return 0


def _scale(args: argparse.Namespace) -> int:
    from pdserve.deploy import local_head, serve_app

    local_head.connect_existing(args.address)
    _trap_sigterm()
    want = {p: n for p, n in (("prefill", args.prefill), ("decode", args.decode)) if n is not None}
    if not want:
        raise ValueError("give --prefill N and/or --decode M")
    serve_app.scale(args.name, want)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        have = serve_app.replica_counts(args.name)
        if all(have[p] == n for p, n in want.items()):
            print(f"{args.name}: " + ", ".join(f"{p} {have[p]}" for p in ("prefill", "decode")))
            return 0
        time.sleep(0.5)
    raise ValueError(f"replicas did not reach {want} in {args.timeout}s")


def _down(args: argparse.Namespace) -> int:
    """The head ``up`` started: every process of it stopped (Serve's replicas with it). A
    cluster given by --address: the app deleted from it, and its registry; the rest stays."""
    from pdserve.deploy import local_head

    record = None if args.address else local_head.HeadRecord.read()
    if record is not None:
        pids = local_head.stop(record)
        print(f"stopped the local Ray head pdserve started ({len(pids)} processes)")
        return 0
    local_head.connect_existing(args.address)
    _trap_sigterm()
    _delete_app(args.name)
    return 0


def _delete_app(name: str) -> None:
    import ray
    from ray import serve

    from pdserve.cluster.replica_registry import NAMESPACE, registry_name

    serve.delete(name)
    try:
        ray.kill(ray.get_actor(registry_name(name), namespace=NAMESPACE))
    except ValueError:  # no registry: the app never reached its replicas
        pass
    print(f"deleted the app {name!r}")


def _build_kernels(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.kernels.flashinfer_aot import build

    build(
        install_dir=args.install_dir and Path(args.install_dir),
        work=args.work_dir and Path(args.work_dir),
        jobs=args.jobs,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pdserve.deploy.demo import run_demo

    return run_demo(port=args.port, max_tokens=args.max_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="write a random-weight checkpoint of a preset's shape")
    p.add_argument(
        "--preset",
        default="tiny",
        help="tiny, deepseek-v2-lite, deepseek-v3-4l, deepseek-v3, gpt-oss-tiny, gpt-oss-20b or "
        "gpt-oss-120b",
    )
    p.add_argument("--out", required=True, help="directory to write")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--mxfp4", action="store_true", help="store routed experts pre-quantized")
    quant.add_argument(
        "--fp8",
        action="store_true",
        help="store every projection as DeepSeek does: float8 E4M3, 128x128 block scales",
    )
    p.add_argument(
        "--config-only",
        action="store_true",
        help="write config and tokenizer alone, for model.random_weights_seed (weights drawn "
        "at load; with --fp8, projections drawn as FP8)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_make_model)

    p = sub.add_parser("generate", help="run prompts through a single-process engine")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--show-ids", action="store_true")
    p.set_defaults(fn=_generate)

    p = sub.add_parser("up", help="start Ray if needed and deploy the app; print the endpoint")
    p.add_argument("-c", "--config", help="a deploy YAML (deploy/configs/*.yaml)")
    p.add_argument(
        "--model", help="checkpoint directory (default: the tiny preset, made if missing)"
    )
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--port", type=int)
    p.add_argument("--address", help="Ray cluster address (default: a local one, started if none)")
    p.set_defaults(fn=_up)

    for cmd, fn, doc in (
        ("status", _status, "pools, replicas, queue depths, KV use and chosen kernels"),
        ("scale", _scale, "set replica counts per pool, in place"),
        ("down", _down, "shut the app down (and the local Ray head `up` started)"),
    ):
        p = sub.add_parser(cmd, help=doc)
        p.add_argument("--address", help="Ray cluster address (default: the local one)")
        p.add_argument("--name", default="pdserve", help="application name")
        p.set_defaults(fn=fn)
        if cmd == "scale":
            p.add_argument("--prefill", type=int)
            p.add_argument("--decode", type=int)
            p.add_argument("--timeout", type=float, default=600)

    from pdserve.bench import serve as bench_serve

    p = sub.add_parser("bench", help="load generator against a running endpoint (bench.serve)")
    bench_serve.add_arguments(p)
    p.set_defaults(fn=bench_serve.run)

    p = sub.add_parser(
        "build-kernels",
        help="build FlashInfer's SM90 bf16 x MXFP4 MoE module ahead of time (needs nvcc, no GPU)",
    )
    p.add_argument(
        "--install-dir", help="AOT folder to install into (default: the installed FlashInfer's)"
    )
    p.add_argument("--work-dir", help="build folder (default: ~/.cache/pdserve/flashinfer-aot)")
    p.add_argument("--jobs", type=int, help="parallel compiles (default: by cores and memory)")
    p.set_defaults(fn=_build_kernels)

    p = sub.add_parser(
        "demo", help="local Ray, tiny model, 1 prefill + 1 decode, streamed requests"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(fn=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    level = logging.getLogger().level
    # Serve sets its own logger's level when it starts: filter what is below ours
    logging.getLogger("ray.serve").addFilter(lambda record: record.levelno >= level)
    _trap_sigterm()
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, ConnectionError) as e:
        print(f"pdserve: {args.command} failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pdserve {args.command}: interrupted", file=sys.stderr)
        return 130


def _trap_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so that what a command started is cleaned up. Again after
    ``ray.init``, whose core worker installs its own handler (which aborts)."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
