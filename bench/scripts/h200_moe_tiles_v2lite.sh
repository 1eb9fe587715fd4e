#!/usr/bin/env bash
# One GPU call (under 560 s): moe_small's tiles (fragment layout) swept at deepseek-v2-lite's
# expert shapes (hidden 2048, intermediate 1408, 64 experts, top-6) at 16, 32 and 64 tokens,
# each winner against the shipped table's tiles in the same run (`bench.kernels --sweep`); then
# the FlashInfer-vs-Triton MLA engine tests and deepseek-v2-lite's decode step with the shipped
# MLA decode split (TRITON_ROWS), batch 1-64 of 1024 tokens. Carry .whl and .fi/fisite.txz.
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
stamp sweep
timeout 230 python3 -m pdserve.bench.kernels --sweep --sweep-tables MOE_SMALL_FRAGMENT \
  --sweep-model deepseek-v2-lite --sweep-m 16,32,64 --sweep-s 200 --parts mla_decode \
  --mla-grid 16:1:1024 --json "$OUT/moe-tiles-v2-lite-${GPU}${TAG}.json" 2>&1 \
  | grep -E "^MOE_SMALL|copy" | head -8
stamp tests
timeout -s INT -k 20 200 python3 -m pytest -q -rfs --tb=short -p no:cacheprovider \
  tests/cluster/test_engine_gpu.py -k "agrees or few" 2>&1 \
  | grep -E "passed|failed|skipped|^E |Error|^FAILED" | tail -10
p=deepseek-v2-lite
config_model "$p"
left=$(( ${BUDGET:-550} - ($(date +%s) - S) ))
stamp "decode $p"
timeout $(( left < 100 ? left : 100 )) python3 -m pdserve.bench.decode_step --model "/tmp/cfg-$p" \
  --random-weights 0 --batches 1,2,4,8,16,64 --context 1024 --steps 16 --modes auto \
  --out "$OUT/decode-step-$p-mla-rows-shipped-${GPU}${TAG}.json" 2>&1 \
  | grep --line-buffered -v Warning | grep -v "while serving" | tail -8
stamp done
