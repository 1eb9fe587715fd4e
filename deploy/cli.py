"""The ``pdserve`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _make_model(args: argparse.Namespace) -> int:
    from cluster.checkpoint_maker import make_model

    start = time.perf_counter()
    out = make_model(args.out, args.preset, mxfp4=args.mxfp4, dtype=args.dtype, seed=args.seed)
    print(f"wrote {args.preset} checkpoint to {out} in {time.perf_counter() - start:.1f}s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="write a random-weight checkpoint of a preset's shape")
    p.add_argument("--preset", default="tiny", help="tiny, deepseek-v2-lite or deepseek-v3-4l")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--mxfp4", action="store_true", help="store routed experts pre-quantized")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
