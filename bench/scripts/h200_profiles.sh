#!/usr/bin/env bash
# One GPU call (under 600 s): where an eager decode step's GPU time goes (attention, MoE, the
# rest), and prefill rates for 4k and 16k prompts against the matmul ceiling, on gpt-oss-20b,
# deepseek-v3-4l and deepseek-v2-lite drawn at load (make-model --config-only); before them the
# FP8 linear's GPU tests and bench (CUDA-graph replays) and the one-GPU cluster e2e.
source "$(dirname "$0")/gpu_env.sh"
for p in gpt-oss-20b deepseek-v3-4l deepseek-v2-lite; do
  [ -f "/tmp/cfg-$p/config.json" ] || python3 -m pdserve make-model --preset "$p" --config-only --out "/tmp/cfg-$p" > /dev/null
done
stamp tests
timeout -s INT -k 20 60 python3 -m pytest -q -rf --tb=line -p no:cacheprovider tests/kernels/test_fp8_gemm.py \
  tests/cluster/model/test_layers.py 2>&1 | grep -vi warning | tail -12
timeout -s INT -k 20 150 python3 -m pytest -q -rf --tb=line -p no:cacheprovider -m gpu tests/e2e/test_cluster_gpu.py 2>&1 \
  | grep -vi warning | tail -8
stamp fp8-gemm
timeout 90 python3 -m pdserve.bench.fp8_gemm --m 1,8,64,2048 --out "$OUT/fp8_gemm-${GPU}${TAG}.json" 2>&1 \
  | grep --line-buffered -v Warning | tail -28
for p in gpt-oss-20b deepseek-v3-4l deepseek-v2-lite; do
  stamp "profile-$p"
  timeout $(( (570 - ($(date +%s) - S)) / 2 )) python3 -m pdserve.bench.decode_step --model "/tmp/cfg-$p" \
    --random-weights 0 --batches 1,64 --context 1024 --steps 8 --modes off --profile \
    --prefill-lens 4096,16384 --out "$OUT/decode-step-profile-$p-${GPU}${TAG}.json" 2>&1 \
    | grep --line-buffered -v Warning | grep -v "while serving" | tail -12
done
stamp done
