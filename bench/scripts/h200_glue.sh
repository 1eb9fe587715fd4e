#!/usr/bin/env bash
# One GPU call (under 600 s): the Triton norm, rope and routing kernels compiled on the GPU (their
# tests and the model's tokens with them), then decode steps with them against the PyTorch ones
# (kernels override; both with CUDA graphs) and an eager profile with kernel counts per part,
# on gpt-oss-20b and deepseek-v3-4l drawn at load (the Triton ones are the default on GPUs; the
# kernels override selects torch's).
source "$(dirname "$0")/gpu_env.sh"
for p in gpt-oss-20b deepseek-v3-4l; do
  [ -f "/tmp/cfg-$p/config.json" ] || python3 -m pdserve make-model --preset "$p" --config-only --out "/tmp/cfg-$p" > /dev/null
done
stamp tests
timeout -s INT -k 20 120 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/kernels/test_rms_norm.py \
  tests/kernels/test_rope.py tests/kernels/test_routing.py tests/kernels/test_moe_small_m.py \
  tests/cluster/model/test_triton_glue.py 2>&1 | grep -vi warning | tail -12
TORCH=rms_norm=torch,rope=torch,grouped_topk=torch
for p in gpt-oss-20b deepseek-v3-4l; do
  for k in "$TORCH" ""; do
    stamp "$p ${k:-triton glue}"
    timeout 100 python3 -m pdserve.bench.decode_step --model "/tmp/cfg-$p" --random-weights 0 \
      --batches 1,8,64 --context 1024 --steps 16 --modes auto,off --profile ${k:+--kernels $k} \
      --out "$OUT/decode-step-glue-$p${k:+-torch}-${GPU}${TAG}.json" 2>&1 \
      | grep --line-buffered -v Warning | grep -v "while serving" | tail -12
  done
done
stamp done
