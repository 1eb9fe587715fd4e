#!/usr/bin/env bash
# One GPU call (under 600 s): the FP8 block linear through cuBLAS (torch._scaled_mm with
# DeepSeek's recipe) against the Triton kernel and bf16 at V3's projections, then deepseek-v3-4l
# with FP8 projections, decode steps and 4k / 16k prompts, with the linear_fp8 backend the
# registry picks (scaled_mm on sm_90) and with the Triton kernel alone. First the GPU tests of
# the FP8 linear, the stacked q_a/kv_a projection, the decode kernels (split counts, tiles),
# FlashInfer's MLA decode, and of eager steps compiling nothing after the warm-up. Every phase
# is time-boxed and prints as it goes; PARTS (default tests,gemm,steps) picks the phases.
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
[ -f /tmp/cfg-fp8-v3-4l/config.json ] || python3 -m pdserve make-model --preset deepseek-v3-4l --fp8 \
  --config-only --out /tmp/cfg-fp8-v3-4l > /dev/null
PARTS=${PARTS:-tests,gemm,steps}
has tests && stamp tests && timeout -s INT -k 20 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_gemm_scaled_mm.py \
  tests/kernels/test_fp8_gemm.py tests/cluster/model/test_layers.py tests/cluster/model/test_stacked_linear.py \
  tests/kernels/test_mla_decode.py tests/kernels/test_gqa_attention.py tests/kernels/test_registry.py \
  tests/kernels/test_mla_decode_flashinfer.py "tests/cluster/test_engine_gpu.py::test_fp8_linears_give_the_dequantized_models_logits" \
  "tests/cluster/test_engine_gpu.py::test_eager_steps_after_the_warm_up_compile_nothing" > /tmp/tests.log 2>&1
has tests && grep -E "passed|failed|^E |Error" /tmp/tests.log | tail -12
has gemm && stamp fp8-gemm && timeout 150 python3 -m pdserve.bench.fp8_gemm --out "$OUT/fp8_gemm-${GPU}${TAG}.json" 2>&1 \
  | grep --line-buffered -v Warning | tail -52
[ -f /tmp/cfg-deepseek-v3-4l/config.json ] || python3 -m pdserve make-model --preset deepseek-v3-4l \
  --config-only --out /tmp/cfg-deepseek-v3-4l > /dev/null
for k in scaled_mm triton bf16; do  # bf16: the same model with bf16 projections
  has steps || break
  stamp "step-$k"
  cfg=/tmp/cfg-fp8-v3-4l name=fp8-$k kernels="linear_fp8=$k"
  [ "$k" = bf16 ] && cfg=/tmp/cfg-deepseek-v3-4l name=bf16 kernels=""
  left=$(( 590 - ($(date +%s) - S) )); [ $left -lt 10 ] && break  # timeout 0 would not stop
  timeout $(( left < 120 ? left : 120 )) \
    python3 -m pdserve.bench.decode_step --model $cfg --random-weights 0 \
    --batches 1,8,64 --context 1024 --steps 16 --modes auto --prefill-lens 4096,16384 \
    --kernels "$kernels" --out "$OUT/decode-step-v3-4l-$name-${GPU}${TAG}.json" 2>&1 \
    | grep --line-buffered -v Warning | tail -10
done
stamp done
