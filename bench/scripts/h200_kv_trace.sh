#!/usr/bin/env bash
# Where a deployment's KV hand-offs spend their time, on nvidia-h200-x2 (one GPU call, ~250 s
# with the model made): the V2-Lite 1P1D deployment with PDSERVE_KV_TRACE on, warmed with 8
# requests at 4 req/s, then N (default 24) requests at 0.5 req/s (seed 1: the low-load trace);
# the decode pool's handoff phase means over the measured run, then `bench.kv_trace` over the
# same requests (each transfer's phases from all four writers, ms from the first token's reply
# at the decode replica). TAG names the files. Environment variables given to this script reach
# every Ray worker (`pdserve up` starts the head with them), e.g.
#   CUDA_DEVICE_MAX_CONNECTIONS=32 TAG=-conn32 bash bench/scripts/h200_kv_trace.sh
# A PYTHONPATH given to it is kept (gpu_env.sh): a folder holding a sitecustomize.py (e.g.
# bench/scripts/gil_switch) then changes every process of the deployment.
source "$(dirname "$0")/gpu_env.sh"
[ -f "$M/config.json" ] || python3 -m pdserve make-model --preset deepseek-v2-lite --mxfp4 --out "$M" > /dev/null
stamp model
run() {  # rate, requests, label
  python3 -m pdserve.bench.serve --url http://127.0.0.1:8000 --model-path "$M" --input-len-range 2048:8192 \
    --output-len-range 128:256 --arrival poisson --num-requests "$2" --warmup 0 --seed 1 \
    --slo-ttft-ms 1000 --slo-tpot-ms 40 --no-progress --no-plots --rate "$1" \
    --label "$3" --out "$OUT/serve-v2lite-$3.json" 2>&1 | grep -v Warn | grep -E "TTFT|TPOT"
}
sed "s#/data/dsv2-lite#$M#" deploy/configs/deepseek_v2_lite_1p1d_gpu.yaml > /tmp/1p1d.yaml
TRACE=/tmp/kvtrace$TAG
rm -rf "$TRACE"
PDSERVE_KV_TRACE=$TRACE timeout 200 python3 -m pdserve up -c /tmp/1p1d.yaml 2>&1 | grep -v Warn | tail -1
stamp up
run 4 8 "kv-trace-warm$TAG"
python3 -m pdserve.bench.handoff --save /tmp/base.txt > /dev/null
run 0.5 "${N:-24}" "kv-trace$TAG"
python3 -m pdserve.bench.handoff --since /tmp/base.txt --out "$OUT/handoff-kv-trace$TAG.json" 2>&1 | grep -v Warn
python3 -m pdserve.bench.kv_trace "$TRACE" --skip 8 --out "$OUT/kv-trace$TAG.json"
python3 -m pdserve down 2>&1 | tail -1
stamp done
