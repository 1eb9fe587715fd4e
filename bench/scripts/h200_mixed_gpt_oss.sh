#!/usr/bin/env bash
# One GPU call (under 560 s): mixed-step CUDA graphs on GPT-OSS (sliding layers, their own
# block tables). The GPU tests of the graphs (their tokens against eager steps, MLA and GPT-OSS;
# no compile after the warm-up), then `bench.mixed_step` for gpt-oss-20b drawn at load: 0, 8
# and 64 decode rows of 1024 tokens beside a new prompt of 16 to 2048 tokens.
source "$(dirname "$0")/gpu_env.sh"
stamp tests
timeout -s INT -k 20 200 python3 -m pytest -q -p no:cacheprovider tests/cluster/test_engine_gpu.py \
  -k "mixed or compile_nothing" > /tmp/tests.log 2>&1
grep -E "passed|failed|^E |Error|Interrupted" /tmp/tests.log | tail -12
p=gpt-oss-20b
[ -f "/tmp/cfg-$p/config.json" ] || python3 -m pdserve make-model --preset "$p" --config-only \
  --out "/tmp/cfg-$p" > /dev/null
stamp "mixed-$p"
timeout $(( 550 - ($(date +%s) - S) )) python3 -m pdserve.bench.mixed_step --model "/tmp/cfg-$p" \
  --random-weights 0 --batches 0,8,64 --chunks 16,64,256,1024,2048 --context 1024 \
  --mixed-max-tokens 2048 --out "$OUT/mixed-step-graphs-$p-${GPU}${TAG}.json" 2>&1 \
  | grep --line-buffered -v Warning | tail -20
stamp done
