#!/usr/bin/env bash
# One GPU call (under 600 s): GPT-OSS served on one H200. The tiny GPT-OSS 1P1D test against
# transformers' tokens (tests/e2e), then gpt-oss-20b's shape with weights drawn at load
# (deploy/configs/gpt_oss_20b_1p1d_one_gpu.yaml), `pdserve status`, and a Poisson trace of
# 1k-4k-token prompts at two rates: TTFT and TPOT (bench.serve).
source "$(dirname "$0")/gpu_env.sh"
G=/tmp/cfg-gpt-oss-20b
RATES=${RATES:-2,6}
[ -f $G/config.json ] || python3 -m pdserve make-model --preset gpt-oss-20b --config-only --out $G > /dev/null
stamp e2e-tiny
timeout -s INT -k 20 200 python3 -m pytest -x -q -rfs --tb=short -p no:cacheprovider -m gpu \
  tests/e2e/test_cluster_gpu.py -k gpt_oss 2>&1 | grep -E "passed|failed|skipped|Error|assert" | tail -8
stamp up
sed "s#/data/gpt-oss-20b#$G#" deploy/configs/gpt_oss_20b_1p1d_one_gpu.yaml > /tmp/gpt-oss-1p1d.yaml
timeout 300 python3 -m pdserve up -c /tmp/gpt-oss-1p1d.yaml 2>&1 | grep -v Warning | tail -3
python3 -m pdserve status 2>&1 | tail -14
stamp serve
timeout $(( 560 - ($(date +%s) - S) )) python3 -m pdserve.bench.serve --url http://127.0.0.1:8000 \
  --model-path $G --input-len-range 1024:4096 --output-len-range 128:256 --arrival poisson \
  --sweep-rates "$RATES" --num-requests 40 --warmup 4 --seed 1 --label gpt-oss-20b-1p1d \
  --out "$OUT/serve-gpt-oss-20b-1p1d-${GPU}${TAG}.json" --no-progress --no-plots 2>&1 | grep -v Warning | tail -24
python3 -m pdserve down 2>&1 | tail -1
stamp done
