#!/usr/bin/env bash
# One GPU call (under 600 s): DeepSeek-V2-Lite's shape served 1P1D on one GPU
# (deploy/configs/deepseek_v2_lite_1p1d_one_gpu.yaml with KV over Ray's object store), a Poisson
# load of 512-2048-token prompts and 128-256-token outputs at two rates: TTFT and TPOT
# (bench.serve). Given BASE_WHL (a pdserve wheel of another commit), the same load runs first
# against a server of that build, installed in /tmp/base: the served change between the two.
# Both servers start from a folder outside the source tree, as Ray workers started in the tree
# import its `pdserve` ahead of the installed one.
source "$(dirname "$0")/gpu_env.sh"
RATES=${RATES:-2,6}
N=${N:-32}
[ -f "$M/config.json" ] || timeout 120 python3 -m pdserve make-model --preset deepseek-v2-lite \
  --mxfp4 --out "$M" 2>&1 | tail -1
sed "s#/data/dsv2-lite#$M#; s#kv_transport: auto#kv_transport: object_store#" \
  deploy/configs/deepseek_v2_lite_1p1d_one_gpu.yaml > /tmp/v2l-1p1d.yaml
builds=new
if [ -n "${BASE_WHL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/base "$BASE_WHL"
  builds="base new"
fi
mkdir -p /tmp/serve-cwd
for b in $builds; do
  P=$PYTHONPATH
  [ "$b" = base ] && P=/tmp/base:$PYTHONPATH
  stamp "up $b"
  (cd /tmp/serve-cwd && PYTHONPATH=$P timeout 200 python3 -m pdserve up -c /tmp/v2l-1p1d.yaml 2>&1 \
    | grep -v Warning | tail -1)
  (cd /tmp/serve-cwd && PYTHONPATH=$P timeout 30 python3 -m pdserve status 2>&1 | tail -4 | cut -c1-200)
  stamp "serve $b"
  timeout $(( 560 - ($(date +%s) - S) )) python3 -m pdserve.bench.serve --url http://127.0.0.1:8000 \
    --model-path "$M" --input-len-range 512:2048 --output-len-range 128:256 --arrival poisson \
    --sweep-rates "$RATES" --num-requests "$N" --warmup 4 --seed 1 --label "deepseek-v2-lite-1p1d-$b" \
    --out "$OUT/serve-deepseek-v2-lite-1p1d-$b${TAG}-${GPU}.json" --no-progress --no-plots 2>&1 \
    | grep -v Warning | tail -5
  (cd /tmp/serve-cwd && PYTHONPATH=$P timeout 60 python3 -m pdserve down 2>&1 | tail -1)
done
stamp done
