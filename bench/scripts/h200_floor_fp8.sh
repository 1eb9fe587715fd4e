#!/usr/bin/env bash
# One GPU call (under 600 s): what the FP8 path and the decode-step floor still lack on a GPU.
# The GPU tests (kernels with the FP8 linear, engine, the one-GPU cluster e2e), the FP8 block
# linear against bf16 at V3's projections, then decode steps against their floors: V3's dims
# (4 layers) in bf16 (with 4k and 16k prompts against the matmul ceiling) and with FP8
# projections, and DeepSeek-V2-Lite, each drawn at load from a seed (make-model --config-only:
# no checkpoint written or read). Every phase is time-boxed and prints as it goes.
source "$(dirname "$0")/gpu_env.sh"
for p in deepseek-v3-4l deepseek-v2-lite; do
  [ -f "/tmp/cfg-$p/config.json" ] || python3 -m pdserve make-model --preset "$p" --config-only --out "/tmp/cfg-$p" > /dev/null
done
[ -f /tmp/cfg-fp8-v3-4l/config.json ] || python3 -m pdserve make-model --preset deepseek-v3-4l --fp8 \
  --config-only --out /tmp/cfg-fp8-v3-4l > /dev/null
stamp tests
timeout -s INT -k 20 60 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_gemm.py \
  tests/cluster/model/test_layers.py > /tmp/tests.log 2>&1
grep -E "passed|failed|^E " /tmp/tests.log | tail -8
timeout -s INT -k 20 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/e2e/test_cluster_gpu.py > /tmp/e2e.log 2>&1
grep -E "passed|failed|^E " /tmp/e2e.log | tail -8
stamp fp8-gemm
timeout 120 python3 -m pdserve.bench.fp8_gemm --out "$OUT/fp8_gemm-${GPU}${TAG}.json" 2>&1 | grep --line-buffered -v Warning | tail -40
stamp floor-v3
timeout 120 python3 -m pdserve.bench.decode_step --model /tmp/cfg-deepseek-v3-4l --random-weights 0 \
  --batches 1,8,64 --context 1024 --steps 16 --modes auto --prefill-lens 4096,16384 \
  --out "$OUT/decode-step-floor-v3-4l-${GPU}${TAG}.json" 2>&1 | grep --line-buffered -v Warning | tail -10
stamp floor-v3-fp8
timeout 100 python3 -m pdserve.bench.decode_step --model /tmp/cfg-fp8-v3-4l --random-weights 0 \
  --batches 1,8,64 --context 1024 --steps 16 --modes auto \
  --out "$OUT/decode-step-floor-v3-4l-fp8-${GPU}${TAG}.json" 2>&1 | grep --line-buffered -v Warning | tail -8
stamp floor-v2-lite
timeout $(( 570 - ($(date +%s) - S) )) python3 -m pdserve.bench.decode_step --model /tmp/cfg-deepseek-v2-lite \
  --random-weights 0 --batches 1,64 --context 1024 --steps 16 --modes auto \
  --out "$OUT/decode-step-floor-v2-lite-${GPU}${TAG}.json" 2>&1 | grep --line-buffered -v Warning | tail -8
stamp done
