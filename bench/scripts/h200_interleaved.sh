#!/usr/bin/env bash
# One GPU call (under 600 s): the Triton MoE kernels on MXFP4 codes bit-interleaved at load
# (the triton_interleaved backends). First the MoE kernels' GPU tests (plain and interleaved
# codes, the dequantized tile bit for bit), then bench.kernels' MoE decode rows (plain and
# interleaved in the same run, triton_kernels beside them when .peers is carried), then
# deepseek-v3-4l decode steps with the plain and the interleaved backends. Carry .whl (and
# .peers for the peer column). PARTS (default tests,kernels,steps) picks the phases.
export PYTHONPATH=$PWD/.peers/triton_kernels-v3.6.0${PYTHONPATH:+:$PYTHONPATH}
source "$(dirname "$0")/gpu_env.sh"
PARTS=${PARTS:-tests,kernels,steps}
has() { [[ ",$PARTS," == *",$1,"* ]]; }
has tests && stamp tests && timeout 200 python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_moe_small_m.py tests/kernels/test_moe_grouped.py tests/kernels/test_mxfp4.py \
  2>&1 | grep -E "passed|failed|^E " | tail -12
has kernels && stamp kernels && PYTHONPATH=$PYTHONPATH:. timeout 200 python3 -m pdserve.bench.kernels \
  --parts moe_decode --json "$OUT/kernels-interleaved-${GPU}${TAG}.json" 2>&1 \
  | grep -v -i "warn\|autotuner" | tail -16
C=/tmp/cfg-deepseek-v3-4l
[ -f $C/config.json ] || python3 -m pdserve make-model --preset deepseek-v3-4l --config-only --out $C > /dev/null
for k in "" moe_small=triton_interleaved,moe_large=triton_interleaved; do
  has steps || break
  stamp "steps ${k:-plain}"
  left=$(( 590 - ($(date +%s) - S) )); [ $left -lt 10 ] && break  # timeout 0 would not stop
  timeout $(( left < 120 ? left : 120 )) python3 -m pdserve.bench.decode_step --model $C \
    --random-weights 0 --batches 1,8,64 --context 1024 --steps 16 --modes auto ${k:+--kernels $k} \
    --out "$OUT/decode-step-v3-4l${k:+-interleaved}-${GPU}${TAG}.json" 2>&1 \
    | grep --line-buffered -v Warning | tail -6
done
stamp done
