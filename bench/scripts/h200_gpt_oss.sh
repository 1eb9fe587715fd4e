#!/usr/bin/env bash
# One GPU call (under 600 s): GPT-OSS on one H200. The GQA attention tests and the engine's
# GPT-OSS test (sliding tables, decode graphs) on the GPU, the decode attention against
# FlashInfer's (sinks, 128-token windows; carry .fi/fisite.txz: FlashInfer JIT-builds it
# there) and the copy ceiling, then a gpt-oss-20b-shaped model (random weights drawn at load:
# make-model --config-only) in bf16: decode steps at batch 1, 8 and 64 against their floor
# (sliding layers read 128 tokens of KV), with a profile of where a step's GPU time goes
# (PROFILE= leaves it out), and 4k/16k prefills against the matmul ceiling (PREFILL= names the
# lengths; MODES=auto,off adds eager steps).
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
[ -f /tmp/cfg-gpt-oss-20b/config.json ] || python3 -m pdserve make-model --preset gpt-oss-20b \
  --config-only --out /tmp/cfg-gpt-oss-20b > /dev/null
stamp tests
timeout -s INT -k 20 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gqa_attention.py \
  tests/cluster/test_gpt_oss_matches_transformers.py "tests/cluster/test_engine_gpu.py::test_gpt_oss_float32_on_the_gpu_matches_transformers" \
  > /tmp/tests.log 2>&1
grep -E "passed|failed|^E " /tmp/tests.log | tail -8
stamp gqa-attention
timeout 240 python3 -m pdserve.bench.gqa_attention --budget-s 150 \
  --json "$OUT/gqa-attention-${GPU}${TAG}.json" 2>&1 | grep --line-buffered -v Warning | tail -30
stamp floor-gpt-oss-20b
timeout $(( 570 - ($(date +%s) - S) )) python3 -m pdserve.bench.decode_step --model /tmp/cfg-gpt-oss-20b --random-weights 0 \
  --batches 1,8,64 --context 1024 --steps 16 --modes ${MODES:-auto} --prefill-lens ${PREFILL:-4096,16384} ${PROFILE---profile} \
  --out "$OUT/decode-step-floor-gpt-oss-20b-${GPU}${TAG}.json" 2>&1 | grep --line-buffered -v Warning | tail -24
stamp done
