#!/usr/bin/env bash
# One GPU call (under 300 s): moe_small's tiles swept at one token for deepseek-v2-lite's and
# gpt-oss-20b's experts (bench.kernels --sweep, each winner against the table's tiles in the
# same run), then where a deepseek-v2-lite decode step's GPU time goes with the shipped kernels
# (bench.decode_step --profile: eager steps at batch 1 and 64 of 1024 tokens, one MoE layer's
# kernels in order). Carry .whl (Ray's wheel may stay behind) and .fi/fisite.txz.
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
for p in deepseek-v2-lite gpt-oss-20b; do
  stamp "sweep $p"
  timeout 80 python3 -m pdserve.bench.kernels --sweep --sweep-tables MOE_SMALL_FRAGMENT \
    --sweep-model "$p" --sweep-m 1 --sweep-s 60 --parts mla_decode --mla-grid 16:1:1024 \
    --json "$OUT/moe-tiles-m1-$p-${GPU}${TAG}.json" 2>&1 | grep -E "^MOE_SMALL|copy" | head -4
done
p=deepseek-v2-lite
config_model "$p"
stamp "profile $p"
left=$(( ${BUDGET:-290} - ($(date +%s) - S) ))
timeout $(( left < 150 ? left : 150 )) python3 -m pdserve.bench.decode_step --model "/tmp/cfg-$p" \
  --random-weights 0 --batches 1,64 --context 1024 --steps 8 --modes off --profile \
  --out "$OUT/decode-step-profile-$p-shipped-${GPU}${TAG}.json" 2>&1 \
  | grep --line-buffered -v Warning | grep -v "while serving" | tail -40
stamp done
