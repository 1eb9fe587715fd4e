#!/usr/bin/env bash
# One GPU call (under 560 s): steps that carry a prefill chunk, eager against the mixed-step
# CUDA graphs. First the GPU tests of the graphs (their tokens against eager steps; no compile
# after the warm-up), then `bench.mixed_step` for deepseek-v2-lite and deepseek-v3-4l, drawn at
# load (make-model --config-only): 0, 8 and 64 decode rows of 1024 tokens beside a new prompt
# of 16 to 2048 tokens, graphs up to 2048 tokens.
source "$(dirname "$0")/gpu_env.sh"
stamp tests
timeout -s INT -k 20 150 python3 -m pytest -q -p no:cacheprovider tests/cluster/test_engine_gpu.py \
  -k "mixed or compile_nothing or decode_graphs_replay" > /tmp/tests.log 2>&1
grep -E "passed|failed|^E |Error|Interrupted" /tmp/tests.log | tail -12
for p in deepseek-v2-lite deepseek-v3-4l; do
  [ -f "/tmp/cfg-$p/config.json" ] || python3 -m pdserve make-model --preset "$p" --config-only \
    --out "/tmp/cfg-$p" > /dev/null
  left=$(( 550 - ($(date +%s) - S) )); [ $left -lt 60 ] && break
  stamp "mixed-$p"
  timeout $(( left < 200 ? left : 200 )) python3 -m pdserve.bench.mixed_step --model "/tmp/cfg-$p" \
    --random-weights 0 --batches 0,8,64 --chunks 16,64,256,1024,2048 --context 1024 \
    --mixed-max-tokens 2048 --out "$OUT/mixed-step-graphs-$p-${GPU}${TAG}.json" 2>&1 \
    | grep --line-buffered -v Warning | tail -18
done
stamp done
