#!/usr/bin/env bash
# One GPU call (under 560 s): where FlashInfer's MLA decode (fa3) hands steps of few decode rows
# to the Triton kernel (kernels/mla_decode_flashinfer.py, TRITON_ROWS). Carry .whl and
# .fi/fisite.txz. Tests: FlashInfer's MLA decode against the reference and in an engine against
# the Triton kernel (decode graphs, mixed-step graphs, steps planned ahead, few rows). Then both
# kernels on the same inputs at 16 and 128 heads, 1-64 sequences (`bench.kernels`), and
# deepseek-v2-lite's decode step (16 heads, weights drawn at load, CUDA graphs, batch 1-64 of
# 1024 tokens) with FlashInfer's kernel at every batch, with the Triton kernel at every batch,
# and with the shipped split. BUDGET: seconds the script may take (550).
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
python3 -c "from pdserve.kernels.mla_decode_flashinfer import unavailable as u; print('flashinfer mla:', u() or 'ready')"
stamp tests
timeout -s INT -k 20 240 python3 -m pytest -q -rfs --tb=short -p no:cacheprovider \
  tests/kernels/test_mla_decode_flashinfer.py tests/cluster/test_engine_gpu.py \
  -k "flashinfer or mixed or few" 2>&1 | grep -E "passed|failed|skipped|^E |Error|^FAILED" | tail -16
stamp "kernels"
timeout 90 python3 -m pdserve.bench.kernels --parts mla_decode \
  --mla-grid 16:1,2,4,8,16,32,64:1024,4096,16384 --json "$OUT/mla-decode-rows-${GPU}${TAG}.json" 2>&1 \
  | grep -v Warning | grep -A40 "^MLA decode" | head -30
timeout 40 python3 -m pdserve.bench.kernels --parts mla_decode \
  --mla-grid 128:1,2,4,8:1024,4096 --json "$OUT/mla-decode-rows-128-${GPU}${TAG}.json" 2>&1 \
  | grep -v Warning | grep -A14 "^MLA decode" | head -12
p=deepseek-v2-lite
config_model "$p"
for v in fa3 triton split; do
  left=$(( ${BUDGET:-550} - ($(date +%s) - S) )); [ $left -lt 40 ] && break
  stamp "decode $p, MLA decode $v"
  k=; [ $v = triton ] && k="--kernels mla_decode=triton"; [ $v = fa3 ] && k="--mla-triton-rows 0"
  timeout $(( left < 110 ? left : 110 )) python3 -m pdserve.bench.decode_step --model "/tmp/cfg-$p" \
    --random-weights 0 --batches 1,2,4,8,16,32,64 --context 1024 --steps 16 --modes auto $k \
    --out "$OUT/decode-step-$p-mla-rows-$v-${GPU}${TAG}.json" 2>&1 \
    | grep --line-buffered -v Warning | grep -v "while serving" | tail -9
done
stamp done
