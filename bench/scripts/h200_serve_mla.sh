#!/usr/bin/env bash
# One GPU call (under 600 s): FlashInfer's MLA decode served. Carry .fi/fisite.txz (FlashInfer,
# JIT-built in the replicas' start-up) on a machine where .whl is installed (a call before, or
# carry it too). First the e2e test of a decode pool running it (tokens against the Triton
# path); then DeepSeek-V2-Lite's shape served 1P1D on one GPU (KV over Ray's object store), the
# decode pool's MLA decode the Triton kernel (kernels override), then the SM90 default
# (FlashInfer's fa3 above 4 decode rows, the Triton kernel below), a Poisson load of
# 512-2048-token prompts and 128-256-token outputs at RATES: TTFT and TPOT (bench.serve).
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
RATES=${RATES:-2,6}
N=${N:-32}
stamp "e2e test"
timeout -s INT -k 20 200 python3 -m pytest -q -rfs --tb=short -p no:cacheprovider -s \
  tests/e2e/test_cluster_gpu.py -k flashinfer_mla 2>&1 \
  | grep -E "passed|failed|skipped|near-ties|^E |Error|^FAILED" | tail -12
[ -f "$M/config.json" ] || timeout 120 python3 -m pdserve make-model --preset deepseek-v2-lite \
  --mxfp4 --out "$M" 2>&1 | tail -1
mkdir -p /tmp/serve-cwd
for mla in triton default; do
  left=$(( 580 - ($(date +%s) - S) )); [ $left -lt 120 ] && break
  k=; [ $mla = triton ] && k="\n        kernels: {mla_decode: triton}"
  sed "s#/data/dsv2-lite#$M#; s#kv_transport: auto#kv_transport: object_store#; \
    s#max_num_seqs: 256#max_num_seqs: 256$k#" \
    deploy/configs/deepseek_v2_lite_1p1d_one_gpu.yaml > /tmp/v2l-1p1d-mla-$mla.yaml
  stamp "up, decode MLA $mla"
  (cd /tmp/serve-cwd && timeout 200 python3 -m pdserve up -c /tmp/v2l-1p1d-mla-$mla.yaml 2>&1 \
    | grep -v Warning | tail -1)
  (cd /tmp/serve-cwd && timeout 30 python3 -m pdserve status 2>&1 | grep -oE "(prefill|decode) kernels|'mla_decode': '[a-z0-9_]+'" | paste -sd' ')
  stamp "serve $mla"
  timeout $(( 570 - ($(date +%s) - S) )) python3 -m pdserve.bench.serve --url http://127.0.0.1:8000 \
    --model-path "$M" --input-len-range 512:2048 --output-len-range 128:256 --arrival poisson \
    --sweep-rates "$RATES" --num-requests "$N" --warmup 4 --seed 1 \
    --label "deepseek-v2-lite-1p1d-mla-$mla" \
    --out "$OUT/serve-deepseek-v2-lite-1p1d-mla-$mla${TAG}-${GPU}.json" --no-progress --no-plots 2>&1 \
    | grep -v Warning | tail -5
  (cd /tmp/serve-cwd && timeout 60 python3 -m pdserve down 2>&1 | tail -1)
done
stamp done
