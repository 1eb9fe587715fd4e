#!/usr/bin/env bash
# On a CPU machine with nvcc: .fi/fisite.txz, FlashInfer for the GPU machine's Python 3.12 with
# the fused_moe_90 module built ahead of time, small enough to travel beside Ray's bundle.
# FlashInfer's wheel and its small dependencies are unpacked, the module installed in its AOT
# folder, and of the sources FlashInfer keeps for JIT builds only what a build reads (its csrc
# and include, spdlog, CUTLASS's headers, CCCL's cub/thrust/libcudacxx headers): the GPU
# machine has nvcc, so its attention kernels (GQA with sinks, MLA fa3) JIT-build there. xz keeps
# the whole at about 10 MB (gzip: 16). The build runs in a venv of
# its own (BUILD_VENV, made when missing; about 16 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
FI=flashinfer-python==0.6.13
VENV=${BUILD_VENV:-/tmp/pdserve-fi-build}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q --no-deps "$FI"
  "$VENV/bin/pip" install -q 'apache-tvm-ffi==0.1.15.post2' ninja 'nvidia-cuda-nvrtc==13.0.*' \
    'nvidia-cublas==13.0.*' nvidia-curand numpy packaging requests einops tqdm tabulate click \
    nvidia-ml-py
fi
mkdir -p .fi
PYTHONPATH=. "$VENV/bin/python" -c "\
from pathlib import Path; from pdserve.kernels.flashinfer_aot import build; \
build(install_dir=Path('.fi/aot'))"
"$VENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -d .fi/wheels "$FI" 'apache-tvm-ffi==0.1.15.post2' einops \
  tabulate nvidia-ml-py tqdm
rm -rf .fi/fisite && mkdir -p .fi/fisite
for w in .fi/wheels/*.whl; do (cd .fi/fisite && unzip -q -o "../../$w"); done
D=.fi/fisite/flashinfer/data
rm -rf $D/cutlass/{examples,python,test,media,docs} $D/cccl/{benchmarks,ci,docs,python,c,cudax}
find $D/cutlass/tools -mindepth 1 -maxdepth 1 ! -name util -exec rm -rf {} +
find $D/cutlass/tools/util -mindepth 1 -maxdepth 1 ! -name include -exec rm -rf {} +
find $D/cccl/libcudacxx -mindepth 1 -maxdepth 1 ! -name include -exec rm -rf {} +
mkdir -p .fi/fisite/flashinfer/data/aot && cp -r .fi/aot/fused_moe_90 .fi/fisite/flashinfer/data/aot/
tar cJf .fi/fisite.txz -C .fi fisite && rm -rf .fi/fisite
ls -la .fi/fisite.txz
