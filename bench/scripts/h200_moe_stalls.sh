#!/usr/bin/env bash
# One GPU call (under 590 s) for what the H200 runs of 2026-12-07 left open (BENCHMARKS.md,
# "Tables for the H200"). PARTS picks the phases:
#   step  (an H200 only) deepseek-v2-lite's decode step at batch 1, 4, 8 of 1k tokens with the
#         H100's 16-head MLA decode tile (16, 32, 4, 4), then with the H200's own (16, 32, 4, 3)
#   v3    deepseek-v3-4l's decode step at batch 1, 8, 64 with FlashInfer's fa3 MLA decode (its
#         H200 steps of 2026-12-05 to 2026-12-07 ran the Triton kernel)
#   ncu   where the MoE decode's time goes on this GPU: Nsight Compute's throughput, scheduler,
#         warp-state and occupancy sections for the two GEMMs at 64 tokens (DeepSeek-V3 and
#         V2-Lite; `bench.moe_splits`, one split), a text file per model in $OUT
#   m1    moe_small's fragment tiles swept at one token (DeepSeek-V3, V2-Lite)
# Default PARTS: step,v3,ncu,m1. Carry .whl and .fi/fisite.txz.
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
PARTS=${PARTS:-step,v3,ncu,m1}
if has step && [ "$GPU" = H200 ]; then
  config_model deepseek-v2-lite
  for v in tiles4 shipped; do
    stamp "step $v"
    k=; [ $v = tiles4 ] && k="--mla-tiles 16,32,4,4"
    timeout 110 python3 -m pdserve.bench.decode_step --model /tmp/cfg-deepseek-v2-lite \
      --random-weights 0 --batches 1,4,8 --context 1024 --steps 16 --modes auto $k \
      --out "$OUT/decode-step-deepseek-v2-lite-mla-$v-${GPU}${TAG}.json" 2>&1 \
      | grep --line-buffered -v Warning | grep -v "while serving" | tail -4
  done
fi
if has v3; then
  config_model deepseek-v3-4l
  stamp "step deepseek-v3-4l"
  timeout 150 python3 -m pdserve.bench.decode_step --model /tmp/cfg-deepseek-v3-4l \
    --random-weights 0 --batches 1,8,64 --context 1024 --steps 16 --modes auto \
    --out "$OUT/decode-step-deepseek-v3-4l-fa3-${GPU}${TAG}.json" 2>&1 \
    | grep --line-buffered -v Warning | grep -v "while serving" | tail -4
fi
if has ncu; then
  for p in deepseek-v3 deepseek-v2-lite; do
    [ "$(left)" -lt 120 ] && { echo "skip ncu $p: $(left) s left"; break; }
    stamp "ncu $p"
    ncu_moe "$OUT/ncu-moe-decode-$p-m64-${GPU}${TAG}.txt" --models "$p" || break
  done
fi
if has m1; then
  for p in deepseek-v3 deepseek-v2-lite; do
    [ "$(left)" -lt 90 ] && { echo "skip m1 $p: $(left) s left"; break; }
    stamp "sweep m1 $p"
    timeout 90 python3 -m pdserve.bench.kernels --sweep --sweep-tables MOE_SMALL_FRAGMENT \
      --sweep-model "$p" --sweep-m 1 --sweep-s 60 --parts mla_decode --mla-grid 16:1:1024 \
      --json "$OUT/moe-tiles-m1-$p-${GPU}${TAG}.json" 2>&1 | grep -E "^MOE_SMALL|copy" | head -4
  done
fi
stamp done
