#!/usr/bin/env bash
# One GPU call (under 600 s): the GPU tests of the engine's launch/collect split and TP graphs,
# the KV transfer bench (with the pair group's own path by message size), the decode-step
# breakdown, decode steps one after another against the serving loop's overlapped order, and
# TP=2 decode steps. Every phase is time-boxed and prints as it goes. Then, in a second call:
#   RATES=0.5,2,4 N=32 SLO_TTFT_MS=1000 SLO_TPOT_MS=40 bash bench/scripts/h200_pd_vs_colocated.sh
source "$(dirname "$0")/gpu_env.sh"
MAKER=""
if [ ! -f "$M/config.json" ]; then
  python3 -m pdserve make-model --preset deepseek-v2-lite --mxfp4 --out "$M" > /tmp/make-model.log 2>&1 &
  MAKER=$!
fi
stamp tests
timeout -s INT -k 20 150 python3 -m pytest -q -p no:cacheprovider tests/cluster/test_engine_gpu.py tests/cluster/test_async_engine.py \
  "tests/cluster/test_tensor_parallel.py::test_tp2_over_nccl_matches_one_gpu" > /tmp/tests.log 2>&1
grep -E "passed|failed|^E " /tmp/tests.log | tail -8
stamp kv-transfer
timeout 150 python3 -m pdserve.bench.kv_transfer --iters 7 --out "$OUT/kv-transfer-NVIDIA_${GPU}.json" \
  2>&1 | grep --line-buffered -v Warning | tail -20
stamp model
[ -n "$MAKER" ] && wait "$MAKER"
tail -1 /tmp/make-model.log 2>/dev/null
stamp profile
timeout 120 python3 -m pdserve.bench.decode_step --model "$M" --batches 1,64 --context 1024 --steps 16 \
  --modes off --profile --out "$OUT/decode-step-profile-${GPU}.json" 2>&1 | grep --line-buffered -v Warning | tail -12
stamp overlap
timeout 120 python3 -m pdserve.bench.decode_step --model "$M" --batches 1,8,32,64 --context 1024 --steps 32 \
  --modes auto --out "$OUT/decode-step-overlap-${GPU}.json" 2>&1 | grep --line-buffered -v Warning | tail -8
stamp tp2
timeout $(( 570 - ($(date +%s) - S) )) python3 -m pdserve.bench.decode_step --model "$M" --tp 2 \
  --batches 1,8,32,64 --context 1024 --steps 16 --modes auto --out "$OUT/decode-step-tp2-${GPU}.json" \
  2>&1 | grep --line-buffered -v Warning | tail -8
stamp done
