#!/usr/bin/env bash
# One GPU call (under 560 s): moe_small's tiles (fragment layout, bench.kernels'
# SWEEP_FRAGMENT) swept at deepseek-v3's expert shapes (16, 64 and 256 tokens; then the MoE
# decode rows against triton_kernels in the same process, on the swept tiles) and at
# deepseek-v2-lite's (16 and 64). BUDGET (seconds, default 550) bounds the whole.
# Carry .whl and .peers (a copy of ../shared/peers/triton_kernels-v3.6.0 in a git-ignored
# folder: the peers travel only with the call, never into the product).
export PYTHONPATH=$PWD/.peers/triton_kernels-v3.6.0${PYTHONPATH:+:$PYTHONPATH}
source "$(dirname "$0")/gpu_env.sh"
stamp "sweep deepseek-v3"
left=$(( ${BUDGET:-550} - 70 ))
timeout $(( left < 330 ? left : 330 )) python3 -m pdserve.bench.kernels --sweep \
  --sweep-tables MOE_SMALL_FRAGMENT --sweep-model deepseek-v3 --sweep-m 16,64,256 \
  --sweep-s $(( left < 330 ? left * 11 / 20 : 200 )) --parts moe_decode \
  --json "$OUT/moe-down-tiles-v3-${GPU}${TAG}.json" 2>&1 | grep -v -i "warn\|autotuner" | tail -30
stamp "sweep deepseek-v2-lite"
left=$(( ${BUDGET:-550} - ($(date +%s) - S) ))
[ "$left" -lt 60 ] && { echo "no time left for deepseek-v2-lite's sweep"; stamp done; exit 0; }
timeout $(( left < 200 ? left : 200 )) python3 -m pdserve.bench.kernels --sweep \
  --sweep-tables MOE_SMALL_FRAGMENT --sweep-model deepseek-v2-lite --sweep-m 16,64 \
  --sweep-s $(( left < 200 ? left - 40 : 150 )) --parts mla_decode --mla-grid 16:1:1024 \
  --json "$OUT/moe-down-tiles-v2-lite-${GPU}${TAG}.json" 2>&1 | grep -E "^MOE_SMALL|copy" | head -8
stamp done
