#!/usr/bin/env bash
# One GPU call (under 600 s): FlashInfer's SM90 MXFP4 MoE through the project's adapter, its
# fused_moe_90 module built ahead of time on a CPU machine (`pdserve build-kernels`). Carry .whl
# and .fi/fisite.txz (made by flashinfer_bundle.sh; together just under 64 MiB). Then: the
# adapter against the PyTorch reference and timed beside the Triton grouped MoE
# (bench.flashinfer_check), and a 1P1D deployment whose prefill pool runs it, its greedy tokens
# against the single-process Triton engine (tests/e2e).
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
python3 -c "from pdserve.kernels.moe_flashinfer import unavailable as u; print('flashinfer:', u() or 'ready')"
stamp check
PYTHONPATH=$PYTHONPATH:. timeout 200 python3 -m pdserve.bench.flashinfer_check \
  --json "$OUT/flashinfer-check-${GPU}${TAG}.json" 2>&1 | grep -v Warning | tail -20
stamp e2e
timeout -s INT -k 20 240 python3 -m pytest -x -q -rfs --tb=short -p no:cacheprovider -m gpu \
  tests/e2e/test_cluster_gpu.py -k flashinfer 2>&1 | grep -E "near-ties|passed|failed|skipped|Error|assert" | tail -15
stamp done
