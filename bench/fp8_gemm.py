"""The FP8 block-scaled linear's two kernels against bf16 matmul, at DeepSeek-V3's projection
shapes, with the ceilings measured in the same run:

    python -P -m pdserve.bench.fp8_gemm [--m 1,8,64,512,2048,8192] [--out PATH]

Per (projection, M): the Triton kernel (``kernels/fp8_gemm_triton.py``) and cuBLAS's block-scaled
GEMM (``kernels/fp8_gemm_scaled_mm.py``, where this torch and GPU have it), each with its
activation quantization, and ``torch.nn.functional.linear`` in bf16 on the dequantized weight,
in ms (medians of CUDA-graph replays with the L2 flushed before each, as a decode step under
graphs runs them: no Python launch time) and TFLOP/s (2 M N K / time); the faster FP8 kernel as
% of the FP8 ceiling and bf16's as % of the bf16 ceiling. Ceilings: an 8192^3 bf16 matmul and an
8192^3 FP8 ``torch._scaled_mm`` (one scale per tensor). Every kernel is first checked against the
PyTorch reference (``rel_err``). ``--device cpu`` runs the Triton kernel under Triton's
interpreter at small shapes: a check that the script works, not a timing.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch

# a projection's (N, K) = (output, input features) at DeepSeek-V3's dims
SHAPES = {
    "q_a_proj": (1536, 7168),
    "q_b_proj": (24576, 1536),
    "kv_a_proj_with_mqa": (576, 7168),
    "q_a + kv_a stacked": (2112, 7168),  # one matmul in MLA attention (StackedLinear)
    "shared expert gate+up": (4096, 7168),
    "o_proj": (7168, 16384),
    "dense gate+up": (36864, 7168),
    "dense down_proj": (7168, 18432),
}
SMALL_SHAPES = {"small": (200, 384)}  # --device cpu


def _ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def ceilings(dev: str, n: int = 8192) -> dict[str, float]:
    x = torch.randn(n, n, device=dev).bfloat16()
    y = torch.randn(n, n, device=dev).bfloat16()
    bf16 = 2 * n**3 / _ms(lambda: x @ y) / 1e9
    a, b = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn).t()  # b column-major, as it needs
    one = torch.ones((), device=dev)
    fp8 = 2 * n**3 / _ms(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)) / 1e9
    return {"bf16_TFLOPs": bf16, "fp8_TFLOPs": fp8}


def row(name: str, n: int, k: int, m: int, dev: str, timed: bool, cublas: bool) -> dict:
    from pdserve.kernels import fp8_gemm_scaled_mm as sm
    from pdserve.kernels.fp8_blocks import dequantize_fp8_blocks, quantize_fp8_blocks
    from pdserve.kernels.fp8_gemm_triton import fp8_block_linear_torch, fp8_block_linear_triton

    g = torch.Generator(device=dev).manual_seed(m)
    w, s = quantize_fp8_blocks(torch.randn(n, k, device=dev, generator=g) / k**0.5)
    x = torch.randn(m, k, device=dev, generator=g).to(
        torch.bfloat16 if dev == "cuda" else torch.float32
    )
    ref = fp8_block_linear_torch(x, w, s).float()
    kernels = {"triton": (fp8_block_linear_triton, (x, w, s))}
    p = sm.prepare((w, s, x.dtype))
    if cublas and p.cublas_fits:
        kernels["scaled_mm"] = (sm.scaled_mm_linear, (x, p))
    r = {"proj": name, "N": n, "K": k, "M": m}
    for kname, (fn, args) in kernels.items():
        got = fn(*args).float()
        r[f"{kname}_rel_err"] = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    if timed:
        from pdserve.bench.kernels import ms_graph

        flops = 2 * m * n * k
        for kname, (fn, args) in kernels.items():
            r[f"{kname}_ms"] = ms_graph(fn, *args)
            r[f"{kname}_TFLOPs"] = flops / r[f"{kname}_ms"] / 1e9
        dense = dequantize_fp8_blocks(w, s, dtype=x.dtype)
        r["bf16_ms"] = ms_graph(torch.nn.functional.linear, x, dense)
        r["bf16_TFLOPs"] = flops / r["bf16_ms"] / 1e9
        r["best"] = min(kernels, key=lambda kn: r[f"{kn}_ms"])
        r["bf16_over_best"] = r["bf16_ms"] / r[f"{r['best']}_ms"]
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.fp8_gemm", description=__doc__)
    p.add_argument(
        "--m", default="1,8,64,128,256,512,2048,8192", help="token counts, comma-separated"
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", help="result JSON (default bench/results/fp8_gemm-<gpu>.json)")
    args = p.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for the interpreter check")
    if dev == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
    ms_list = [int(v) for v in args.m.split(",")]
    timed = dev == "cuda"
    gpu = torch.cuda.get_device_name() if timed else "cpu"
    out: dict = {"gpu": gpu, "date": datetime.date.today().isoformat(), "rows": []}
    cublas = False
    if timed:
        from pdserve.kernels.fp8_gemm_scaled_mm import unavailable

        out["ceilings"] = ceil = ceilings(dev)
        out["scaled_mm"] = why = unavailable() or "available"
        cublas = why == "available"
        print(f"{gpu}: bf16 matmul {ceil['bf16_TFLOPs']:.0f}, FP8 {ceil['fp8_TFLOPs']:.0f} TFLOP/s;"
              f" cuBLAS block-scaled GEMM: {why}")  # fmt: skip
    print(f"{'projection':20}{'M':>6}{'triton ms':>10}{'err':>8}{'cublas ms':>10}{'err':>8}"
          f"{'%fp8':>7}{'bf16 ms':>10}{'%bf16':>7}{'bf16/best':>10}")  # fmt: skip
    for name, (n, k) in (SHAPES if timed else SMALL_SHAPES).items():
        for m in ms_list:
            r = row(name, n, k, m, dev, timed, cublas)
            out["rows"].append(r)
            t_err = f"{r['triton_rel_err']:>8.0e}"
            if not timed:
                print(f"{name:20}{m:>6}{'':>10}{t_err}")
                continue
            r["pct_fp8"] = 100 * r[f"{r['best']}_TFLOPs"] / ceil["fp8_TFLOPs"]
            r["pct_bf16"] = 100 * r["bf16_TFLOPs"] / ceil["bf16_TFLOPs"]
            c_ms = f"{r['scaled_mm_ms']:>10.3f}" if "scaled_mm_ms" in r else f"{'-':>10}"
            c_err = f"{r['scaled_mm_rel_err']:>8.0e}" if "scaled_mm_ms" in r else f"{'':>8}"
            print(f"{name:20}{m:>6}{r['triton_ms']:>10.3f}{t_err}{c_ms}{c_err}"
                  f"{r['pct_fp8']:>7.1f}{r['bf16_ms']:>10.3f}{r['pct_bf16']:>7.1f}"
                  f"{r['bf16_over_best']:>9.2f}x")  # fmt: skip
    from pdserve.bench.result_file import write_result

    write_result(out, "fp8_gemm", gpu, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
