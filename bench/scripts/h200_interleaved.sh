#!/usr/bin/env bash
# GPU calls (each under 600 s): the Triton MoE kernels on experts in the MMA-fragment layout
# (``mxfp4.interleave_mxfp4``, the triton_interleaved backends). PARTS picks the phases:
#   tests    the MoE kernels' GPU tests (both layouts, the dequantized tile bit for bit)
#   decode   bench.kernels' MoE decode rows (plain and fragment layout in the same run,
#            triton_kernels beside them when .peers is carried)
#   prefill  bench.kernels' MoE prefill rows, likewise
#   steps    deepseek-v3-4l and deepseek-v2-lite decode steps, plain and fragment layout
# Default: tests,decode,steps. Carry .whl (and .peers for the peer column).
export PYTHONPATH=$PWD/.peers/triton_kernels-v3.6.0${PYTHONPATH:+:$PYTHONPATH}
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-tests,decode,steps}
has tests && stamp tests && timeout -s INT -k 20 200 python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_moe_small_m.py tests/kernels/test_moe_grouped.py tests/kernels/test_mxfp4.py \
  2>&1 | grep -E "passed|failed|^E |^FAILED" | tail -12
for part in decode prefill; do
  has $part || continue
  stamp "kernels $part"
  timeout $(( $(left) < 300 ? $(left) : 300 )) python3 -m pdserve.bench.kernels \
    --parts moe_$part --budget-s 240 --json "$OUT/kernels-moe-$part-fragment-${GPU}${TAG}.json" 2>&1 \
    | grep -v -i "warn\|autotuner" | tail -16
done
for preset in deepseek-v3-4l deepseek-v2-lite; do
  has steps || break
  C=/tmp/cfg-$preset
  [ -f $C/config.json ] || python3 -m pdserve make-model --preset $preset --config-only \
    --out $C > /dev/null
  for k in moe_small=triton,moe_large=triton \
      moe_small=triton_interleaved,moe_large=triton_interleaved; do
    stamp "steps $preset $k"
    [ $(left) -lt 20 ] && break  # timeout 0 would not stop
    timeout $(( $(left) < 100 ? $(left) : 100 )) python3 -m pdserve.bench.decode_step --model $C \
      --random-weights 0 --batches 1,8,64 --context 1024 --steps 16 --modes auto --kernels $k \
      --out "$OUT/decode-step-$preset$([[ $k == *interleaved* ]] && echo -fragment)-${GPU}${TAG}.json" 2>&1 \
      | grep --line-buffered -v Warning | tail -5
  done
done
stamp done
