#!/usr/bin/env bash
# One GPU call (under 600 s): op linear (the decode step's dense projections in one Triton
# kernel) and the distinct-expert topk_softmax, on whichever card comes. First their GPU tests
# and the Triton glue test, then `bench.linear_tiles` (every candidate tile against cuBLAS at
# DeepSeek-V2-Lite's, V3's and GPT-OSS's projections, 1 and 8 rows), then `bench.decode_step`
# of the three presets with the op (the sm_90 default) and with cuBLAS (`--kernels
# linear=torch`), in turn on one machine. PARTS (default tests,tiles,steps) picks the phases.
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-tests,tiles,steps}
has tests && stamp tests && timeout -s INT -k 20 230 python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_linear.py tests/kernels/test_routing.py tests/kernels/test_registry.py \
  tests/cluster/model/test_triton_glue.py tests/cluster/model/test_attention.py \
  tests/bench/test_linear_tiles.py > /tmp/tests.log 2>&1
has tests && grep -E "passed|failed|^E |Error" /tmp/tests.log | tail -12
has tiles && stamp tiles && timeout 150 python3 -m pdserve.bench.linear_tiles --rows 1,8 \
  --budget-s 110 --out "$OUT/linear-tiles-${GPU}${TAG}.json" 2>&1 | grep -v Warning | tail -30
for preset in deepseek-v2-lite deepseek-v3-4l gpt-oss-20b; do
  has steps || break
  [ -f /tmp/cfg-$preset/config.json ] || python3 -m pdserve make-model --preset $preset \
    --config-only --out /tmp/cfg-$preset > /dev/null
  for k in "" linear=torch; do
    left=$(( 590 - ($(date +%s) - S) )); [ $left -lt 10 ] && break 2  # timeout 0 would not stop
    stamp "steps-$preset ${k:-linear=triton}"
    timeout $(( left < 70 ? left : 70 )) \
      python3 -m pdserve.bench.decode_step --model /tmp/cfg-$preset --random-weights 0 \
      --batches 1,8,64 --context 1024 --steps 16 --modes auto ${k:+--kernels $k} \
      --out "$OUT/decode-step-$preset${k:+-cublas}-${GPU}${TAG}.json" 2>&1 \
      | grep --line-buffered -v Warning | tail -4
  done
done
stamp done
