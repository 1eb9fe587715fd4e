"""The ahead-of-time build of FlashInfer's SM90 W4A16 MoE module: ``pdserve build-kernels``.

FlashInfer JIT-builds ``fused_moe_90`` from 182 sources on first use (about 45 minutes on 16
cores), compiling every dtype pair. The bf16 x MXFP4 path the ``flashinfer_cutlass`` backend
calls needs 25 of them: 15 fixed units (the bf16 x fp4 GEMM, the binding, routing and
finalize, the weight interleave, common utilities) and the generated CUTLASS files that hold
``sm90_generic_mixed_moe_gemm_kernelLauncher<__nv_bfloat16, __nv_fp4_e2m1, ...>``. This builds
those into ``fused_moe_90.so`` with the stock spec's flags and installs it in FlashInfer's AOT
directory, where ``JitSpec.build_and_load`` loads it before any JIT. Other dtype pairs of that
module then fail when called (their symbols are absent), which the backend never does.

No GPU is needed: nvcc (CUDA 12.8 or newer, for sm_90a with FP4 types), the CUDA headers and
libraries of the ``nvidia-*`` wheels, and a stub ``libcuda.so`` (made here when the machine
has no driver) are enough. FlashInfer reads its settings when imported, so this module sets
them first and refuses to run in a process that imported FlashInfer already.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pdserve.kernels.moe_flashinfer import MODULE

# the source layout the selection below was read from (flashinfer-python 0.6.10 .. 0.6.15)
SUPPORTED = ((0, 6, 10), (0, 6, 15))
FIXED_SOURCES = (
    "moe_gemm_kernels_bf16_fp4.cu",
    "flashinfer_cutlass_fused_moe_binding.cu",
    "cutlass_fused_moe_instantiation.cu",
    "moe_gemm_tma_warp_specialized_input.cu",
    "moe_gemm_mixed_utils.cu",
    "fp8_blockscale_gemm.cu",
    "deepgemm_jit_setup.cu",
    "envUtils.cpp",
    "logger.cpp",
    "stringUtils.cpp",
    "tllmException.cpp",
    "memoryUtils.cu",
    "preQuantScaleKernel.cu",
    "cutlass_heuristic.cpp",
    "lora.cpp",
)
MIXED_LAUNCHER = "sm90_generic_mixed_moe_gemm_kernelLauncher<__nv_bfloat16, __nv_fp4_e2m1"
# what the link needs from the nvidia-* wheels, by the header or library that shows it is there
NEEDED_HEADERS = ("nvrtc.h", "curand.h", "cublasLt.h")
PIP_HINT = (
    "pip install --no-deps flashinfer-python==0.6.13 && pip install 'apache-tvm-ffi>=0.1.6,<0.2' "
    "ninja 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cublas==13.0.*' nvidia-curand"
)


@dataclass(frozen=True)
class Toolchain:
    """Where the build finds nvcc, the nvidia-* wheels' headers and the libraries it links."""

    cuda_home: Path
    nvcc_version: tuple[int, int]
    include_dirs: tuple[Path, ...]
    lib_dir: Path  # holds libnvrtc.so and, without a driver, a stub libcuda.so


def parse_version(text: str) -> tuple[int, ...]:
    """'0.6.13' or '0.6.13.post1' -> (0, 6, 13)."""
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def find_cuda_home(env: dict[str, str], local: Path = Path("/usr/local")) -> Path:
    """CUDA_HOME, CUDA_PATH, the nvcc on PATH, ``local``/cuda, the newest ``local``/cuda-*:
    the first holding both bin/nvcc and include/cuda_runtime.h."""
    candidates = [env.get("CUDA_HOME"), env.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    candidates += [str(Path(nvcc).resolve().parent.parent) if nvcc else None, str(local / "cuda")]
    newest_first = sorted(local.glob("cuda-*"), key=lambda c: parse_version(c.name), reverse=True)
    candidates += map(str, newest_first)
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists():
            if (Path(c) / "include" / "cuda_runtime.h").exists():
                return Path(c)
    raise RuntimeError(
        f"no nvcc found (looked in CUDA_HOME, CUDA_PATH, PATH and /usr/local/cuda: {candidates}); "
        "install the CUDA toolkit 12.8 or newer and set CUDA_HOME"
    )


def nvcc_version(cuda_home: Path) -> tuple[int, int]:
    out = subprocess.run(
        [str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60
    ).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    if not found:
        raise RuntimeError(f"cannot read the release of {cuda_home}/bin/nvcc from {out!r}")
    return int(found[1]), int(found[2])


def nvidia_wheel_dirs() -> list[Path]:
    """The include/ and lib/ parents of the installed nvidia-* wheels (nvidia/cu13/..., or one
    folder per library in CUDA 12 wheels)."""
    try:
        import nvidia  # a namespace package
    except ImportError:
        return []
    roots = [Path(p) for p in nvidia.__path__]
    return sorted({d.parent for r in roots for d in r.glob("**/include") if d.is_dir()})


def make_lib_dir(work: Path, roots: list[Path], cuda_home: Path) -> Path:
    """work/lib with libnvrtc.so (the link takes -lnvrtc) and, where no libcuda.so is found,
    a stub whose soname is libcuda.so.1 (the driver's, loaded at run time)."""
    lib = work / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    nvrtc = [
        p for r in roots for p in (r / "lib").glob("libnvrtc.so.*") if "builtins" not in p.name
    ]
    nvrtc += list((cuda_home / "lib64").glob("libnvrtc.so*"))
    if not nvrtc:
        raise RuntimeError(f"no libnvrtc.so found in {roots} or {cuda_home}/lib64: {PIP_HINT}")
    link = lib / "libnvrtc.so"
    link.unlink(missing_ok=True)
    link.symlink_to(sorted(nvrtc, key=lambda p: len(p.name))[0])
    has_driver = any(
        (d / "libcuda.so").exists()
        for d in (cuda_home / "lib64", cuda_home / "lib64" / "stubs", Path("/usr/lib64"))
    )
    if not has_driver:
        src = lib / "cuda_stub.c"
        src.write_text("/* link-time stand-in for the driver library */\n")
        cmd = ["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib / "libcuda.so")]
        subprocess.run([*cmd, str(src)], check=True, capture_output=True, timeout=120)
    return lib


def toolchain(work: Path, env: dict[str, str]) -> Toolchain:
    cuda_home = find_cuda_home(env)
    version = nvcc_version(cuda_home)
    if version < (12, 8):
        raise RuntimeError(f"nvcc {version[0]}.{version[1]} at {cuda_home}: FP4 needs 12.8+")
    roots = nvidia_wheel_dirs()
    includes = [cuda_home / "include"] + [r / "include" for r in roots]
    missing = [h for h in NEEDED_HEADERS if not any((d / h).exists() for d in includes)]
    if missing:
        raise RuntimeError(f"headers {missing} not found in {includes}: {PIP_HINT}")
    return Toolchain(cuda_home, version, tuple(includes[1:]), make_lib_dir(work, roots, cuda_home))


def check_flashinfer_version() -> str:
    try:
        version = importlib.metadata.version("flashinfer-python")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"flashinfer-python is not installed: {PIP_HINT}") from None
    if not SUPPORTED[0] <= parse_version(version) <= SUPPORTED[1]:
        lo, hi = (".".join(map(str, v)) for v in SUPPORTED)
        raise RuntimeError(
            f"flashinfer-python {version}: the source selection is known for {lo} .. {hi}"
        )
    return version


def select_sources(sources: list[Path]) -> list[Path]:
    """The 15 fixed units by name and the generated files holding the bf16 x fp4 launcher."""
    by_name = {p.name: p for p in sources}
    missing = [n for n in FIXED_SOURCES if n not in by_name]
    if missing:
        raise RuntimeError(f"FlashInfer's {MODULE} spec lacks {missing}: its layout changed")
    generated = [
        p for p in sources if p.name.endswith(".generated.cu") and MIXED_LAUNCHER in p.read_text()
    ]
    if not generated:
        raise RuntimeError(f"no generated source of {MODULE} holds {MIXED_LAUNCHER}")
    return [by_name[n] for n in FIXED_SOURCES] + sorted(generated)


def build_env(work: Path, tools: Toolchain, jobs: int) -> dict[str, str]:
    """The settings FlashInfer reads at import: its workspace under ``work`` (not the user's JIT
    cache, whose full-spec build.ninja would take this module's name), sm_90a alone, the
    wheels' headers and the library folder."""
    includes = " ".join(f"-I{d}" for d in tools.include_dirs)
    return {
        "CUDA_HOME": str(tools.cuda_home),
        "FLASHINFER_WORKSPACE_BASE": str(work),
        "FLASHINFER_CUDA_ARCH_LIST": "9.0a",
        "FLASHINFER_EXTRA_CFLAGS": includes,
        "FLASHINFER_EXTRA_CUDAFLAGS": includes,
        "FLASHINFER_EXTRA_LDFLAGS": f"-L{tools.lib_dir} -Wl,-rpath-link,{tools.lib_dir}",
        "MAX_JOBS": str(jobs),
    }


def default_jobs() -> int:
    """One compile per core and per 8 GiB of memory (the largest unit peaks near 9 GB)."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 16.0
    return max(1, min(os.cpu_count() or 1, int(mem_gib // 8)))


def run_ninja(build_dir: Path, jobs: int, log: Callable[[str], None]) -> None:
    """ninja in build_dir, each unit logged as ninja reports it, with the time so far; its
    output kept in build_dir/build.log and its tail raised with the failure."""
    start = time.monotonic()
    cmd = ["ninja", "-C", str(build_dir), "-j", str(jobs)]
    with open(build_dir / "build.log", "w") as keep:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in proc.stdout:
            keep.write(line)
            tail = (tail + [line])[-40:]
            step = re.match(r"\[(\d+)/(\d+)\]", line)
            if step:  # a compile names its source after -c, the link its output after -o
                what = re.search(r" -c (\S+)", line) or re.search(r" -o (\S+)", line)
                name = Path(what[1]).name if what else line.split()[1]
                log(f"[{step[1]}/{step[2]}] {name} ({time.monotonic() - start:.0f} s)")
        if proc.wait():
            raise RuntimeError(f"ninja failed ({build_dir}/build.log):\n" + "".join(tail))


def build(
    install_dir: Path | None = None,
    work: Path | None = None,
    jobs: int | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> Path:
    """Build ``fused_moe_90.so`` and install it as ``<install_dir>/fused_moe_90/fused_moe_90.so``
    (default: the AOT directory of the FlashInfer this Python imports). Returns its path."""
    if "flashinfer" in sys.modules:
        raise RuntimeError("flashinfer was imported before its build settings could be set")
    version = check_flashinfer_version()
    work = (work or Path.home() / ".cache" / "pdserve" / "flashinfer-aot" / version).resolve()
    jobs = jobs or default_jobs()
    tools = toolchain(work, dict(os.environ))
    os.environ.update(build_env(work, tools, jobs))
    log(f"flashinfer {version}, nvcc {tools.nvcc_version} at {tools.cuda_home}, {jobs} jobs")

    from flashinfer.jit import env as jit_env
    from flashinfer.jit.fused_moe import gen_cutlass_fused_moe_sm90_module

    stock = gen_cutlass_fused_moe_sm90_module()
    spec = replace(stock, sources=select_sources(list(stock.sources)))
    log(f"{len(spec.sources)} of the stock spec's {len(stock.sources)} sources; work in {work}")
    spec.write_ninja()
    start = time.monotonic()
    run_ninja(spec.build_dir, jobs, log)
    built = spec.jit_library_path
    if not built.exists():
        raise RuntimeError(f"ninja finished without {built}")
    target_dir = Path(install_dir or jit_env.FLASHINFER_AOT_DIR) / MODULE
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{MODULE}.so"
    shutil.copy2(built, target.with_suffix(".so.tmp"))
    os.replace(target.with_suffix(".so.tmp"), target)  # a loader never sees half a file
    size = target.stat().st_size / 2**20
    log(f"built in {time.monotonic() - start:.0f} s: {target} ({size:.1f} MiB)")
    return target
