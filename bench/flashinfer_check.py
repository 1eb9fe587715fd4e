"""Correctness and speed of the FlashInfer SM90 MoE adapter, where FlashInfer can run.

``python -m pdserve.bench.flashinfer_check [--json PATH]``: exits 2, naming the reason, when
``kernels.moe_flashinfer.unavailable()`` says FlashInfer (or its fused_moe_90 module) is missing.
Otherwise: (1) against moe_mxfp4_torch on DeepSeek-V3, DeepSeek-V2-Lite and GPT-OSS-120B shapes
(GPT-OSS: 2880 padded to 2944, clamped SwiGLU, biases) with invalid expert ids planted and the
output poisoned; (2) times it beside the Triton grouped kernel for M = 1 .. 16384 at DeepSeek-V3
shapes, after one FlashInfer autotune pass per M (do_bench medians, L2 flushed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from pdserve.kernels.moe_flashinfer import moe_flashinfer, prepare, unavailable
from pdserve.kernels.moe_reference import moe_mxfp4_torch
from pdserve.kernels.moe_triton_grouped import moe_grouped_triton
from tests.kernels.kernel_cases import REAL_MOE_SHAPES, random_moe, random_routing, rel_err

SPEED_M = (1, 16, 128, 1024, 4096, 16384)


def autotuned(fn):
    """Run fn once inside FlashInfer's autotuner (profiles tactics for this M); return fn."""
    from flashinfer.autotuner import autotune

    with autotune(True):
        fn()
    torch.cuda.synchronize()
    return fn


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    why = unavailable()
    if why is not None:
        print(f"FlashInfer MoE not available: {why}")
        return 2
    if torch.cuda.get_device_capability() != (9, 0):
        print(f"FlashInfer's SM90 MoE needs sm_90, this is {torch.cuda.get_device_name()}")
        return 2
    dev = torch.device("cuda")
    out = {"gpu": torch.cuda.get_device_name(), "correctness": [], "speed": []}
    ok = True
    for shape in REAL_MOE_SHAPES:
        w = random_moe(shape.experts, shape.hidden, shape.inter, bias=shape.bias, device=dev)
        fw = prepare(w)
        for m in (1, 37, 1024):
            ids, tw = random_routing(m, shape.experts, shape.top_k, device=dev, invalid=True)
            x = torch.randn(m, shape.hidden, device=dev).bfloat16()
            got = moe_flashinfer(x, fw, ids, tw, shape.act)
            err = rel_err(got, moe_mxfp4_torch(x, w, ids, tw, shape.act))
            ok &= err < 2e-2
            out["correctness"].append({"model": shape.name, "M": m, "rel_err": err})
            print(f"{shape.name:<18} M={m:<5} rel err {err:.2e} {'ok' if err < 2e-2 else 'FAIL'}")
    shape = REAL_MOE_SHAPES[0]
    w = random_moe(shape.experts, shape.hidden, shape.inter, device=dev)
    fw = prepare(w)
    print("deepseek-v3      M   flashinfer ms   triton grouped ms")
    for m in SPEED_M:
        ids, tw = random_routing(m, shape.experts, shape.top_k, device=dev)
        x = torch.randn(m, shape.hidden, device=dev).bfloat16()
        fi = autotuned(lambda: moe_flashinfer(x, fw, ids, tw, shape.act))  # noqa: B023
        t_fi = do_bench(fi, warmup=25, rep=100, return_mode="median")
        t_tr = do_bench(
            lambda: moe_grouped_triton(x, w, ids, tw, shape.act),  # noqa: B023
            warmup=25,
            rep=100,
            return_mode="median",
        )
        out["speed"].append({"M": m, "flashinfer_ms": t_fi, "triton_grouped_ms": t_tr})
        print(f"{'':<16}{m:>5}{t_fi:>16.3f}{t_tr:>20.3f}")
    path = args.json or Path(__file__).parent / "results" / "flashinfer-check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
