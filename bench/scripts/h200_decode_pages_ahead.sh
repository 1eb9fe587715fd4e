#!/usr/bin/env bash
# GPU calls (under 590 s each): the Triton MLA decode with each KV tile's pages read one tile
# ahead, so that tiles of s stages hold s - 1 KV buffers, against the kernel before the change
# where .whl-base holds that commit's wheel (installed to /tmp/base). PARTS picks the phases:
#   tests    the MLA decode's GPU tests (pipelined tiles among them), the log in $OUT
#   mla16    `bench.mla_decode_tiles` at 16 heads beside FlashInfer's fa3 and fa2, 1-128
#            sequences of 1k and 4k tokens; long16: 4-16 sequences of 16k and 32k; splits16:
#            32 and 64 sequences of 1k and 4k at half, once and twice the kernel's split count
#   base16   the kernel before the change, its own candidates, 1-64 sequences of 1k and 4k
#   mla128   the same at 128 heads, 1-128 sequences of 1k-32k; base128: before, 8-128 of 4k
#   steps    deepseek-v2-lite's decode step (`bench.decode_step`, weights drawn at load, CUDA
#            graphs, batch 1, 8, 64 of 1024 tokens): before, after, after with steps of up to
#            8 decode rows on the Triton kernel instead of fa3 (STEP_RUNS, STEP_BATCHES: fewer)
# Default PARTS: tests,mla16,base16,mla128. BUDGET: seconds the script may take (590). Carry
# .whl (Ray's wheel may stay behind), .fi/fisite.txz and .whl-base.
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
PARTS=${PARTS:-tests,mla16,base16,mla128}
BASE=
if ls .whl-base/pdserve-*.whl > /dev/null 2>&1; then
  [ -d /tmp/base/pdserve ] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/base .whl-base/pdserve-*.whl
  BASE=/tmp/base:$PYTHONPATH
fi
if has tests; then
  stamp tests
  timeout -s INT -k 10 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_mla_decode.py \
    tests/kernels/test_mla_decode_flashinfer.py > "$OUT/tests-mla-decode-${GPU}${TAG}.log" 2>&1
  grep -E "passed|failed|^E |^FAILED" "$OUT/tests-mla-decode-${GPU}${TAG}.log" | tail -12
fi
mla() {  # name, budget, then bench.mla_decode_tiles' arguments
  local name=$1 budget=$2; shift 2
  [ "$(left)" -lt $(( budget + 30 )) ] && { echo "skip $name: $(left) s left"; return; }
  stamp "$name"
  timeout $(( budget + 60 )) python3 -m pdserve.bench.mla_decode_tiles --budget-s "$budget" "$@" \
    --out "$OUT/mla-decode-tiles-$name-${GPU}${TAG}.json" 2>&1 | grep -E "^H=|Error" | head -30
}
has mla16 && mla pages-ahead-16 130 --heads 16 --batches 1,4,8,16,32,64,128 --contexts 1024,4096
has long16 && mla pages-ahead-16-long 50 --heads 16 --batches 4,8,16 --contexts 16384,32768
has splits16 && mla pages-ahead-16-splits 50 --heads 16 --batches 32,64 --contexts 1024,4096 \
  --split-factors 0.5,1,2
[ -n "$BASE" ] && has base16 && PYTHONPATH=$BASE mla pages-in-loop-16 60 --heads 16 \
  --batches 1,8,64 --contexts 1024,4096
has mla128 && mla pages-ahead-128 $(( $(left) - 40 )) --heads 128 --batches 1,8,32,128 \
  --contexts 1024,4096,32768
[ -n "$BASE" ] && has base128 && PYTHONPATH=$BASE mla pages-in-loop-128 40 --heads 128 \
  --batches 8,32,128 --contexts 4096
if has steps; then
  p=deepseek-v2-lite
  config_model "$p"
  for v in ${STEP_RUNS:-before after after-rows8}; do
    [ $v = before ] && [ -z "$BASE" ] && continue
    left=$(left); [ "$left" -lt 40 ] && { echo "skip steps $v: $left s left"; break; }
    stamp "decode $p, $v"
    path=$PYTHONPATH k=; [ $v = before ] && path=$BASE; [ $v = after-rows8 ] && k="--mla-triton-rows 8"
    PYTHONPATH=$path timeout $(( left < 120 ? left : 120 )) python3 -m pdserve.bench.decode_step \
      --model "/tmp/cfg-$p" --random-weights 0 --batches "${STEP_BATCHES:-1,8,64}" --context 1024 \
      --steps 16 --modes auto $k --out "$OUT/decode-step-$p-pages-$v-${GPU}${TAG}.json" 2>&1 \
      | grep --line-buffered -v Warning | grep -v "while serving" | tail -6
  done
fi
stamp done
