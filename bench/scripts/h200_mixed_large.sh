#!/usr/bin/env bash
# One GPU call (under 560 s): mixed-step CUDA graphs up to 8192 tokens against eager steps,
# and what capturing them costs at start-up (seconds, GPU memory). `bench.mixed_step` for
# deepseek-v2-lite and deepseek-v3-4l, drawn at load: 0 and 64 decode rows of 1024 tokens
# beside a new prompt of 1024 to 8192 tokens. BUDGET: seconds the script may take (550).
source "$(dirname "$0")/gpu_env.sh"
for p in deepseek-v2-lite deepseek-v3-4l; do
  [ -f "/tmp/cfg-$p/config.json" ] || python3 -m pdserve make-model --preset "$p" --config-only \
    --out "/tmp/cfg-$p" > /dev/null
  left=$(( ${BUDGET:-550} - ($(date +%s) - S) )); [ $left -lt 60 ] && break
  stamp "mixed-large-$p"
  timeout $(( left < 270 ? left : 270 )) python3 -m pdserve.bench.mixed_step --model "/tmp/cfg-$p" \
    --random-weights 0 --batches 0,64 --chunks 1024,2048,4096,8192 --context 1024 --reps 3 \
    --mixed-max-tokens 8192 --out "$OUT/mixed-step-graphs-8k-$p-${GPU}${TAG}.json" 2>&1 \
    | grep --line-buffered -v Warning | tail -14
done
stamp done
