#!/usr/bin/env bash
# One GPU call (under 600 s): FlashInfer's SM90 MXFP4 MoE through the project's adapter, with the
# fused_moe_90 module built ahead of time on a CPU machine. Needs, in .fi/ (git-ignored, carried):
# FlashInfer's wheel and its small dependencies for Python 3.12 (`pip download --no-deps
# --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .fi
# flashinfer-python==0.6.13 'apache-tvm-ffi==0.1.15.post2' einops tabulate nvidia-ml-py tqdm`)
# and the module (`pdserve build-kernels --install-dir .fi/aot`). Ray's bundle must be in
# /tmp/site already (a call just before, on the same warm machine, carried .whl): both do not
# fit under one call's 64 MiB. Then: the adapter against the PyTorch reference and timed beside
# the Triton grouped MoE (bench.flashinfer_check), and a 1P1D deployment whose prefill pool
# runs it, its greedy tokens against the single-process Triton engine (tests/e2e).
source "$(dirname "$0")/gpu_env.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .fi/*.whl
AOT=$(python3 -c "from flashinfer.jit import env; print(env.FLASHINFER_AOT_DIR)")
mkdir -p "$AOT" && cp -r .fi/aot/fused_moe_90 "$AOT"/
python3 -c "from pdserve.kernels.moe_flashinfer import unavailable as u; print('flashinfer:', u() or 'ready')"
stamp check
PYTHONPATH=/tmp/site:. timeout 240 python3 -m pdserve.bench.flashinfer_check \
  --json "$OUT/flashinfer-check-H200${TAG}.json" 2>&1 | grep -v Warning | tail -20
stamp e2e
timeout 240 python3 -m pytest -x -q -rfs --tb=short -p no:cacheprovider -m gpu \
  tests/e2e/test_cluster_gpu.py -k flashinfer 2>&1 | grep -E "near-ties|passed|failed|skipped|Error|assert" | tail -15
stamp done
