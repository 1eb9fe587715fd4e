#!/usr/bin/env bash
# GPU tests (decode CUDA graphs, TP=2, 1P1D over NCCL), then the decode-step bench (graphs
# on/off, profile) and the transformers peer on DeepSeek-V2-Lite's shape.
# Run from the repo root on the two-H200 machine with the Ray wheels in .whl (see README).
source "$(dirname "$0")/gpu_env.sh"
if [ ! -f "$M/config.json" ]; then
  (time python3 -m pdserve make-model --preset deepseek-v2-lite --mxfp4 --out "$M") > "$OUT/make-model.log" 2>&1 &
fi
TESTS=${TESTS:-tests/cluster/test_engine_gpu.py tests/cluster/test_tensor_parallel.py tests/e2e/test_cluster_gpu.py}
timeout -s INT -k 20 240 python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -15
wait
tail -4 "$OUT/make-model.log" 2>/dev/null
python3 -m pdserve.bench.decode_step --model "$M" --batches 1,8,32,64 --context 1024 --steps 32 \
  --profile --prefill-lens 2048,8192 --out "$OUT/decode-step-${GPU}.json" 2>&1 | grep -v Warning
python3 -m pdserve.bench.hf_peer --model "$M" --batches 1,8,32,64 --context 1024 \
  --ours "$OUT/decode-step-${GPU}.json" --out "$OUT/hf-peer-${GPU}.json" 2>&1 | grep -v Warning
