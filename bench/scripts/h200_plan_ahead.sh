#!/usr/bin/env bash
# One GPU call (under 600 s): decode steps planned ahead. First the GPU tests (captured decode
# graphs with steps planned ahead against steps planned after the tokens, MLA and GQA; the same
# through FlashInfer's MLA decode when .fi/fisite.txz is carried; a draw's rows and host copy;
# the decode graphs' replays), then `bench.decode_step` on deepseek-v3-4l and deepseek-v2-lite
# (random weights drawn at load) at batch 1, 8 and 64: the step one after another, the serving
# loop's overlapped order, and that order with steps planned ahead (the `ahead` columns), with
# each run's floor. PARTS (default tests,steps) picks the phases.
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
PARTS=${PARTS:-tests,steps}
has tests && stamp tests && timeout -s INT -k 20 240 python3 -m pytest -q -p no:cacheprovider \
  "tests/cluster/test_engine_gpu.py::test_steps_planned_ahead_replay_the_tokens_of_steps_planned_after" \
  "tests/cluster/test_engine_gpu.py::test_flashinfer_plans_steps_planned_ahead" \
  "tests/cluster/test_engine_gpu.py::test_decode_graphs_replay_the_tokens_of_eager_steps" \
  "tests/cluster/test_engine_gpu.py::test_gpt_oss_float32_on_the_gpu_matches_transformers" \
  tests/cluster/test_sampler.py > /tmp/tests.log 2>&1
has tests && grep -E "passed|failed|^E |Error" /tmp/tests.log | tail -12
for preset in deepseek-v3-4l deepseek-v2-lite; do
  has steps || break
  [ -f /tmp/cfg-$preset/config.json ] || python3 -m pdserve make-model --preset $preset \
    --config-only --out /tmp/cfg-$preset > /dev/null
  stamp "steps-$preset"
  left=$(( 590 - ($(date +%s) - S) )); [ $left -lt 10 ] && break  # timeout 0 would not stop
  timeout $(( left < 150 ? left : 150 )) \
    python3 -m pdserve.bench.decode_step --model /tmp/cfg-$preset --random-weights 0 \
    --batches 1,8,64 --context 1024 --steps 32 --modes auto \
    --out "$OUT/decode-step-ahead-$preset-${GPU}${TAG}.json" 2>&1 \
    | grep --line-buffered -v Warning | tail -8
done
stamp done
