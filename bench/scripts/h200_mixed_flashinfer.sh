#!/usr/bin/env bash
# One GPU call (under 560 s): mixed-step CUDA graphs with FlashInfer's MLA decode (carry .whl and
# .fi/fisite.txz; FlashInfer JIT-builds its fa3 kernels there). Tests: FlashInfer's MLA decode
# in an engine against the Triton kernel (decode graphs, mixed-step graphs, steps planned ahead)
# and the mixed-step graphs' tokens against eager steps. Then `bench.mixed_step` on
# deepseek-v2-lite drawn at load, colocated: 8 and 64 decode rows of 1024 tokens beside a new
# prompt of 16 to 2048 tokens, with FlashInfer's MLA decode (the SM90 default) and with the
# Triton kernel (kernels override); then the same model's decode steps (CUDA graphs, batch 1, 8
# and 64 of 1024 tokens) with each, as time allows. BUDGET: seconds the script may take (550).
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
python3 -c "from pdserve.kernels.mla_decode_flashinfer import unavailable as u; print('flashinfer mla:', u() or 'ready')"
stamp tests
timeout -s INT -k 20 260 python3 -m pytest -q -rfs --tb=short -p no:cacheprovider \
  tests/cluster/test_engine_gpu.py -k "flashinfer or mixed" 2>&1 \
  | grep -E "passed|failed|skipped|^E |Error" | tail -14
p=deepseek-v2-lite
config_model "$p"
for mla in flashinfer triton; do
  left=$(( ${BUDGET:-550} - ($(date +%s) - S) )); [ $left -lt 60 ] && break
  stamp "mixed $p, MLA decode $mla"
  k=; [ $mla = triton ] && k=mla_decode=triton  # flashinfer: the SM90 default
  timeout $(( left < 140 ? left : 140 )) python3 -m pdserve.bench.mixed_step --model "/tmp/cfg-$p" \
    --random-weights 0 --batches 8,64 --chunks 16,256,1024,2048 --context 1024 --reps 3 \
    ${k:+--kernels $k} --out "$OUT/mixed-step-graphs-$p-mla-$mla-${GPU}${TAG}.json" 2>&1 \
    | grep --line-buffered -v Warning | grep -E "^ +[0-9]|captured|mla_decode|Error" | tail -12
done
for mla in flashinfer triton; do  # the decode step of the full-depth model, both kernels
  left=$(( ${BUDGET:-550} - ($(date +%s) - S) )); [ $left -lt 50 ] && break
  stamp "decode $p, MLA decode $mla"
  k=; [ $mla = triton ] && k=mla_decode=triton
  timeout $(( left < 100 ? left : 100 )) python3 -m pdserve.bench.decode_step --model "/tmp/cfg-$p" \
    --random-weights 0 --batches 1,8,64 --context 1024 --steps 16 --modes auto ${k:+--kernels $k} \
    --out "$OUT/decode-step-$p-mla-$mla-${GPU}${TAG}.json" 2>&1 \
    | grep --line-buffered -v Warning | grep -v "while serving" | tail -6
done
stamp done
