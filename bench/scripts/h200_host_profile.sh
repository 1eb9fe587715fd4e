#!/usr/bin/env bash
# One GPU call (under 240 s): where the host's time goes in an eager forward of a step with a
# prefill chunk (cProfile, the 30 busiest functions by their own time). deepseek-v2-lite drawn
# at load, 8 decode rows of 1024 tokens beside a new prompt of 16 and 256 tokens; mixed-step
# graphs off (the eager path is what is profiled).
source "$(dirname "$0")/gpu_env.sh"
p=deepseek-v2-lite
[ -f "/tmp/cfg-$p/config.json" ] || python3 -m pdserve make-model --preset "$p" --config-only \
  --out "/tmp/cfg-$p" > /dev/null
stamp "host-profile-$p"
timeout 220 python3 -m pdserve.bench.mixed_step --model "/tmp/cfg-$p" --random-weights 0 \
  --batches 8 --chunks 16,256 --context 1024 --reps 3 --mixed-max-tokens 0 --host-profile 30 \
  --out "$OUT/mixed-step-host-profile-$p-${GPU}${TAG}.json" 2>&1 | grep -v Warning | tail -75
stamp done
