"""What Triton makes of a kernel's main loop for sm_90, compiled on any machine (no GPU needed):
its shared memory, the buffers its pipelined loads rotate through, how many copy groups its
waits leave in flight, and, where ``cuobjdump`` is found (Triton 3.6 bundles it; else on PATH),
the loop's SASS instructions per element and thread:

    python -P -m pdserve.bench.sm90_loops mla_decode 16,128,8,2 16,64,8,3
    python -P -m pdserve.bench.sm90_loops moe_gemm2 64,64,4,4 128,64,4,4

Tiles: mla_decode BLOCK_H,BLOCK_N,warps,stages (DeepSeek's D = 576, 64-token pages, split);
moe_gemm1 / moe_gemm2 BLOCK_N,BLOCK_K,warps,stages[,AHEAD[,maxnreg]] (fragment layout, one
multiply per pair, 16-row token blocks; AHEAD, ``moe_k_loops``: tiles loaded that many ahead
into registers, stages then 1; maxnreg: the registers a thread may take, 0 for no cap). One KV
or weight buffer, or waits that leave no copy in flight ("waits 0"), mean a tile's loads do not
overlap the products of the tile before. The figures are the installed Triton's (printed); the
GPU machines run 3.6.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton

from pdserve.bench.result_file import write_result

# per kernel: (its module in pdserve.kernels, its name, its pointer arguments' types, a tile ->
# (the constexprs, elements of one loop iteration per thread))
_MLA_PTRS = dict(q_ptr="*bf16", kv_ptr="*bf16", bt_ptr="*i32", lens_ptr="*i32", o_ptr="*bf16",
                 part_ptr="*fp32", lse_ptr="*fp32")  # fmt: skip
_MOE_PTRS = dict(w_ptr="*i32", s_ptr="*i32", b_ptr="*bf16", expert_ptr="*i32", start_ptr="*i32",
                 count_ptr="*i32", slots_ptr="*i32")  # fmt: skip
_MOE = dict(UPCAST=False, FAST=2, INTERLEAVED=True, SWAP=True, SPLIT_K=1, BLOCK_M=16, PDL=True,
            HAS_BIAS=False)  # fmt: skip


def _mla(t):
    consts = dict(V_DIM=512, R_DIM=64, PAGE=64, SPLIT=True, BLOCK_H=t[0], BLOCK_N=t[1],
                  BLOCK_V=512, BLOCK_R=64, HAS_R=True, UPCAST=False, PDL=True)  # fmt: skip
    return consts, t[1] * 576 / (t[2] * 32)


def _moe(t, gate_up: bool):
    consts = dict(_MOE, BLOCK_N=t[0], BLOCK_K=t[1], AHEAD=t[4] if len(t) > 4 else 0) | (
        dict(TOPK=8, HAS_LIMIT=False) if gate_up else {}
    )
    return consts, t[0] * t[1] * (2 if gate_up else 1) / (t[2] * 32)


def _gqa(t):
    consts = dict(D=64, GROUP=8, PAGE=64, SPLIT=True, BLOCK_G=t[0], BLOCK_N=t[1], HAS_SINKS=True,
                  HAS_WINDOW=True, UPCAST=False)  # fmt: skip
    return consts, t[1] * 2 * 64 / (t[2] * 32)


KERNELS = {
    "mla_decode": ("mla_decode_triton", "_decode_kernel", _MLA_PTRS, _mla),
    "gqa_decode": ("gqa_decode_triton", "_decode_kernel",
                   dict(_MLA_PTRS, sink_ptr="*fp32"), _gqa),
    "moe_gemm1": ("moe_triton_small_m", "_gemm1_kernel",
                  dict(_MOE_PTRS, x_ptr="*bf16", h_ptr="*bf16"), lambda t: _moe(t, True)),
    "moe_gemm2": ("moe_triton_small_m", "_gemm2_kernel",
                  dict(_MOE_PTRS, h_ptr="*bf16", tw_ptr="*fp32", ys_ptr="*fp32"),
                  lambda t: _moe(t, False)),
}  # fmt: skip


def compile_sm90(kernel: str, tiles: tuple[int, ...]):
    """The kernel compiled for sm_90 at these tiles (pointers and strides 16-aligned), and the
    elements one thread takes per loop iteration."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, ptrs, make = KERNELS[kernel]
    fn = getattr(importlib.import_module(f"pdserve.kernels.{module}"), name)
    consts, elements = make(tiles)
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        sig[a] = "constexpr" if a in consts else ptrs.get(a, "i32")
        if a in ptrs or a.startswith("stride") or a in ("H", "I"):  # sizes: multiples of 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=tiles[2], num_stages=tiles[3])
    if len(tiles) > 5 and tiles[5]:
        opts["maxnreg"] = tiles[5]
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options=opts), elements


def loop_buffers(ttgir: str) -> list[int]:
    """Stages of each multi-buffered allocation (the leading dim of the mutable local_allocs
    the pipeliner makes), in order."""
    return [int(n) for n in re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x", ttgir)]


def loop_waits(ttgir: str) -> list[int]:
    """The copy groups each ``async_wait`` from the first loop on leaves in flight (the last,
    after the loop, drains them: 0)."""
    body = ttgir[ttgir.find("scf.for") :]
    return [int(n) for n in re.findall(r"ttg\.async_wait[^\n]*\{num = (\d+) : i32\}", body)]


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


def sass_loop(sass: str) -> tuple[int, collections.Counter]:
    """The innermost loop holding a tensor-core instruction (HGMMA or HMMA): its instruction
    count and opcodes. Loops are the spans of backward branches."""
    ins = [(int(a, 16), text.strip()) for a, text in _SASS.findall(sass)]
    best: list[tuple[int, str]] | None = None
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?\b0x([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) > addr:
            continue
        body = [x for x in ins if int(m.group(1), 16) <= x[0] <= addr]
        has_mma = any(re.search(r"\bH(G)?MMA\b", t) for _, t in body)
        if has_mma and (best is None or len(body) < len(best)):
            best = body
    if best is None:
        return 0, collections.Counter()
    ops = collections.Counter(
        re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for _, t in best
    )
    return len(best), ops


def cuobjdump() -> str | None:
    """Triton's bundled cuobjdump, else the one on PATH."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def describe(kernel: str, tiles: tuple[int, ...], tool: str | None) -> dict:
    """One row: shared memory, buffers, waits and (with ``tool``) registers per thread and the
    SASS loop."""
    compiled, elements = compile_sm90(kernel, tiles)
    ttgir = compiled.asm["ttgir"]
    row = {"kernel": kernel, "tiles": list(tiles), "smem": compiled.metadata.shared,
           "buffers": loop_buffers(ttgir), "waits": loop_waits(ttgir)}  # fmt: skip
    if tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
            res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
        regs = re.search(r"REG:(\d+)", res.stdout)
        n, ops = sass_loop(sass)
        row["registers"] = int(regs.group(1)) if regs else None
        row |= {"loop_instructions": n, "per_element": round(n / elements, 2),
                "top_opcodes": ops.most_common(8)}  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.sm90_loops", description=__doc__)
    p.add_argument("kernel", choices=sorted(KERNELS))
    p.add_argument("tiles", nargs="+", help="four numbers each (MoE: four to six), comma-separated")
    p.add_argument("--json", default=None, help="also write the rows there")
    args = p.parse_args(argv)
    try:
        tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles]
    except ValueError:
        tiles = []
    moe = args.kernel.startswith("moe")
    if not tiles or any(len(t) not in ((4, 5, 6) if moe else (4,)) for t in tiles):
        sizes = "four to six" if moe else "four"
        p.error(f"tiles {args.tiles}: {sizes} comma-separated numbers each")
    if any(len(t) > 4 and t[4] not in (0, 1, 2) for t in tiles):
        p.error(f"tiles {args.tiles}: AHEAD (the fifth number) is 0, 1 or 2")
    tool = cuobjdump()
    print(f"triton {triton.__version__}, sm_90; SASS: {tool or 'no cuobjdump found'}")
    rows = []
    for t in tiles:
        r = describe(args.kernel, t, tool)
        rows.append(r)
        extra = (
            f"  {r['registers']} registers, loop {r['loop_instructions']} = "
            f"{r['per_element']}/element"
            if tool
            else ""
        )
        print(f"{args.kernel} {t}: smem {r['smem']} B, buffers {r['buffers']}, "
              f"waits {r['waits']}{extra}", flush=True)  # fmt: skip
    if args.json:
        result = {"date": datetime.date.today().isoformat(), "triton": triton.__version__,
                  "target": "sm_90", "command": "python -P -m pdserve.bench.sm90_loops "
                  + " ".join(argv if argv is not None else sys.argv[1:]), "rows": rows}  # fmt: skip
        write_result(result, "sm90-loops", "CPU", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
