#!/usr/bin/env bash
# One GPU call (under 600 s): FlashInfer's attention kernels on one H200 (carry .whl and
# .fi/fisite.txz; FlashInfer JIT-builds them there). Tests: FlashInfer's MLA decode (planned per
# step, eager and replayed from CUDA graphs) against the PyTorch reference and, in an engine,
# against the Triton kernel's tokens; the engine's GPU tests, GPT-OSS's (sliding tables, decode
# graphs) against transformers among them; the GQA kernels. Then GPT-OSS's decode attention
# against FlashInfer's (bench.gqa_attention), and deepseek-v3-4l decode steps (CUDA graphs) with
# FlashInfer's MLA decode against the Triton kernel's (kernels override), contexts 1k, 4k and
# 16k (batch 32 at most there). GQA=0 leaves the GQA bench out; K selects tests (pytest -k).
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
C=/tmp/cfg-deepseek-v3-4l
[ -f $C/config.json ] || python3 -m pdserve make-model --preset deepseek-v3-4l --config-only --out $C > /dev/null
python3 -c "from pdserve.kernels.mla_decode_flashinfer import unavailable as u; print('flashinfer mla:', u() or 'ready')"
stamp tests
timeout -s INT -k 20 240 python3 -m pytest -q -rfs --tb=short -p no:cacheprovider tests/kernels/test_mla_decode_flashinfer.py \
  tests/cluster/test_engine_gpu.py tests/kernels/test_gqa_attention.py ${K:+-k "$K"} 2>&1 | grep -E "passed|failed|skipped|^E |Error" | tail -14
[ "${GQA:-1}" = 1 ] && stamp gqa-attention && timeout 150 python3 -m pdserve.bench.gqa_attention --budget-s 90 \
  --json "$OUT/gqa-attention-${GPU}${TAG}.json" 2>&1 | grep --line-buffered -v Warning | tail -22
for ctx in 1024 4096 16384; do
  B=1,8,64; [ $ctx -gt 4096 ] && B=1,8,32
  for k in mla_decode=triton ""; do
    stamp "v3-4l ctx $ctx ${k:-default (flashinfer_fa3)}"
    timeout 90 python3 -m pdserve.bench.decode_step --model $C --random-weights 0 \
      --batches $B --context $ctx --steps 16 --modes auto ${k:+--kernels $k} \
      --out "$OUT/decode-step-mla-$ctx${k:+-triton}-${GPU}${TAG}.json" 2>&1 \
      | grep --line-buffered -v Warning | grep -v "while serving" | tail -6
  done
done
stamp done
