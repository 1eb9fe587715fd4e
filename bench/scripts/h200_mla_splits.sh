#!/usr/bin/env bash
# One GPU call (under 560 s): the Triton MLA decode's split count for one or two resident
# programs per SM (kernels/mla_decode_triton.py, split_count, programs_per_sm). Carry .whl (Ray's
# wheels may stay behind: nothing here starts a cluster), .fi/fisite.txz (the peers) and
# .whl-base: a wheel of the code to compare with (`pip wheel --no-deps` of another commit),
# installed to /tmp/base. First `bench.mla_decode_splits` (both counts beside fa3 and fa2 at 16 and
# 128 heads, 8-128 sequences of 1k and 4k); then the decode steps of deepseek-v2-lite (16
# heads) and deepseek-v3-4l (128 heads) with the Triton MLA decode, the base wheel's code and
# this tree's, one after the other (CUDA graphs, weights drawn at load, 1024 tokens).
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
rm -rf /tmp/base && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/base \
  .whl-base/pdserve-*.whl
stamp kernels
timeout 220 python3 -m pdserve.bench.mla_decode_splits --heads 16,128 --batches 8,16,32,64,128 \
  --contexts 1024,4096 --budget-s 180 --out "$OUT/mla-decode-splits-${GPU}${TAG}.json" 2>&1 \
  | grep -v Warning | tail -24
for p in deepseek-v2-lite deepseek-v3-4l; do
  config_model "$p"
  b=16,32,64; [ $p = deepseek-v3-4l ] && b=8,64
  for code in base tree; do
    left=$(( ${BUDGET:-550} - ($(date +%s) - S) )); [ $left -lt 40 ] && break
    stamp "decode $p, $code"
    pp=; [ $code = base ] && pp=/tmp/base:
    PYTHONPATH=$pp$PYTHONPATH timeout $(( left < 80 ? left : 80 )) python3 -m \
      pdserve.bench.decode_step --model "/tmp/cfg-$p" --random-weights 0 --batches $b \
      --context 1024 --steps 16 --modes auto --kernels mla_decode=triton \
      --out "$OUT/decode-step-$p-mla-splits-$code-${GPU}${TAG}.json" 2>&1 \
      | grep --line-buffered -v Warning | grep -v "while serving" | tail -4
  done
done
stamp done
