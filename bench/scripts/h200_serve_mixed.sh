#!/usr/bin/env bash
# One GPU call (under 600 s): what the prefill replica's mixed-step CUDA graphs change served.
# DeepSeek-V2-Lite's shape served 1P1D on one GPU (deploy/configs/deepseek_v2_lite_1p1d_one_gpu.yaml,
# KV over Ray's object store), the prefill pool's `cuda_graph_max_tokens` set to each of
# MAX_TOKENS in turn (0: its steps run eagerly), a Poisson load of 512-2048-token prompts and
# 128-256-token outputs at RATES: TTFT and TPOT (bench.serve), one result file per setting.
source "$(dirname "$0")/gpu_env.sh"
RATES=${RATES:-2,6}
N=${N:-32}
MAX_TOKENS=${MAX_TOKENS:-0 2048}
[ -f "$M/config.json" ] || timeout 120 python3 -m pdserve make-model --preset deepseek-v2-lite \
  --mxfp4 --out "$M" 2>&1 | tail -1
mkdir -p /tmp/serve-cwd
for t in $MAX_TOKENS; do
  sed "s#/data/dsv2-lite#$M#; s#kv_transport: auto#kv_transport: object_store#; \
    s#max_num_batched_tokens: 16384#max_num_batched_tokens: 16384\n        cuda_graph_max_tokens: $t#" \
    deploy/configs/deepseek_v2_lite_1p1d_one_gpu.yaml > /tmp/v2l-1p1d-$t.yaml
  stamp "up, prefill graphs to $t tokens"
  (cd /tmp/serve-cwd && timeout 200 python3 -m pdserve up -c /tmp/v2l-1p1d-$t.yaml 2>&1 \
    | grep -v Warning | tail -1)
  stamp "serve $t"
  timeout $(( 560 - ($(date +%s) - S) )) python3 -m pdserve.bench.serve --url http://127.0.0.1:8000 \
    --model-path "$M" --input-len-range 512:2048 --output-len-range 128:256 --arrival poisson \
    --sweep-rates "$RATES" --num-requests "$N" --warmup 4 --seed 1 \
    --label "deepseek-v2-lite-1p1d-mixed-$t" \
    --out "$OUT/serve-deepseek-v2-lite-1p1d-mixed-$t${TAG}-${GPU}.json" --no-progress --no-plots 2>&1 \
    | grep -v Warning | tail -5
  (cd /tmp/serve-cwd && timeout 60 python3 -m pdserve down 2>&1 | tail -1)
done
stamp done
