#!/usr/bin/env bash
# Two GPU calls on nvidia-h200-x2 (each under 600 s; the second right after the first, while the
# machine is warm and the model made):
#   bash bench/scripts/h200_ttft.sh check   # GPU tests, KV transfer bench, the model made
#   bash bench/scripts/h200_ttft.sh serve   # 1P1D against colocated 2x1 at low load
# "serve": each deployment first takes the trace's shapes at 2 req/s (a warm-up run, kept but
# not the comparison), then the measured run at 0.5 req/s (32 requests, seed 1: the low-load
# trace); the decode pool's handoff phases as means over the measured run; then the
# request-by-request TTFT table of the two. TAG (e.g. -low-load) names the files; the
# Serve mode is what `pdserve up` starts (throughput-optimized unless
# RAY_SERVE_THROUGHPUT_OPTIMIZED=0 is exported).
source "$(dirname "$0")/gpu_env.sh"
quiet() { grep --line-buffered -v Warning; }

if [ "${1:-}" = check ]; then
  MAKER=""
  if [ ! -f "$M/config.json" ]; then
    python3 -m pdserve make-model --preset deepseek-v2-lite --mxfp4 --out "$M" > /tmp/make-model.log 2>&1 &
    MAKER=$!
  fi
  stamp tests
  timeout -s INT -k 20 170 python3 -m pytest -q -p no:cacheprovider tests/cluster/test_kv_transport.py \
    tests/cluster/test_engine_gpu.py tests/cluster/test_async_engine.py > /tmp/tests.log 2>&1
  grep -E "passed|failed|^E " /tmp/tests.log | tail -8
  stamp kv-transfer
  timeout 150 python3 -m pdserve.bench.kv_transfer --iters 7 --out "$OUT/kv-transfer-NVIDIA_${GPU}.json" 2>&1 | quiet | tail -22
  stamp model
  [ -n "$MAKER" ] && wait "$MAKER"
  tail -1 /tmp/make-model.log 2>/dev/null
  stamp done
  exit 0
fi

[ -f "$M/config.json" ] || python3 -m pdserve make-model --preset deepseek-v2-lite --mxfp4 --out "$M" > /dev/null
run() {  # rate, requests, warm-up requests, label
  python3 -m pdserve.bench.serve --url http://127.0.0.1:8000 --model-path "$M" --input-len-range 2048:8192 \
    --output-len-range 128:256 --arrival poisson --num-requests "$2" --warmup "$3" --seed 1 \
    --slo-ttft-ms 1000 --slo-tpot-ms 40 --no-progress --no-plots --rate "$1" \
    --label "$4" --out "$OUT/serve-v2lite-$4.json" 2>&1 | quiet | grep -E "==|TTFT|TPOT|goodput"
}
for name in 1p1d colocated_2x1; do
  stamp "$name up"
  sed "s#/data/dsv2-lite#$M#" "deploy/configs/deepseek_v2_lite_${name}_gpu.yaml" > "/tmp/$name.yaml"
  timeout 200 python3 -m pdserve up -c "/tmp/$name.yaml" 2>&1 | quiet | tail -1
  run 2 16 4 "ttft-warm$TAG-$name"
  python3 -m pdserve.bench.handoff --save /tmp/base.txt > /dev/null
  stamp "$name measured run"
  run 0.5 32 0 "ttft$TAG-$name"
  python3 -m pdserve.bench.handoff --since /tmp/base.txt --out "$OUT/handoff-ttft$TAG-$name.json" 2>&1 | quiet
  python3 -m pdserve down 2>&1 | tail -1
done
stamp compare
python3 -m pdserve.bench.serve --compare "$OUT/serve-v2lite-ttft$TAG-colocated_2x1.json" \
  "$OUT/serve-v2lite-ttft$TAG-1p1d.json" --slo-ttft-ms 1000 --slo-tpot-ms 40 --no-plots 2>&1 | quiet
stamp done
