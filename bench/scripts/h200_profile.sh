#!/usr/bin/env bash
# GPU session: the decode-step breakdown (profiler, one GPU) and TP=2 decode steps with and
# without CUDA graphs, on DeepSeek-V2-Lite's shape. Two-H200 machine, Ray wheels in .whl.
set -u
export PYTHONPATH=/tmp/site:. NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-bench/results}
M=${MODEL:-/tmp/dsv2-lite}
[ -d /tmp/site/ray ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
[ -f "$M/config.json" ] || python3 -m deploy.cli make-model --preset deepseek-v2-lite --mxfp4 --out "$M" > /dev/null
python3 -m bench.decode_step --model "$M" --batches 1,64 --context 1024 --steps 16 --modes off \
  --profile --out "$OUT/decode-step-profile-H200.json" 2>&1 | grep -v Warning | tail -8
python3 -m bench.decode_step --model "$M" --tp 2 --batches 1,8,32,64 --context 1024 --steps 16 \
  --out "$OUT/decode-step-tp2-H200.json" 2>&1 | grep -v Warning | tail -14
