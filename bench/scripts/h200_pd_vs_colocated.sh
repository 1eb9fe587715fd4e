#!/usr/bin/env bash
# On two H200s: DeepSeek-V2-Lite's shape (random weights, MXFP4 experts),
# colocated 2x1 against 1 prefill + 1 decode, the same Poisson trace swept over request rates.
# Env: RATES (req/s, comma-separated), N (requests per rate), SLO_TTFT_MS, SLO_TPOT_MS, IN, OUT_LEN,
# TAG (names the files), WARM (requests of a warm-up run at 4 req/s before the sweep, not kept;
# default 16: the first run after start-up pays for first-use compilation, 0 skips it).
source "$(dirname "$0")/gpu_env.sh"
RATES=${RATES:-1,2,3,4}
N=${N:-48}
WARM=${WARM:-16}
[ -f "$M/config.json" ] || python3 -m pdserve make-model --preset deepseek-v2-lite --mxfp4 --out "$M" > /dev/null
for name in colocated_2x1 1p1d; do
  sed "s#/data/dsv2-lite#$M#" "deploy/configs/deepseek_v2_lite_${name}_gpu.yaml" > "/tmp/$name.yaml"
  start=$(date +%s)
  timeout 300 python3 -m pdserve up -c "/tmp/$name.yaml" 2>&1 | grep -v Warning | tail -3
  echo "$name up in $(( $(date +%s) - start ))s"
  python3 -m pdserve status 2>&1 | tail -12
  if [ "$WARM" -gt 0 ]; then
    python3 -m pdserve.bench.serve --url http://127.0.0.1:8000 --model-path "$M" \
      --input-len-range "${IN:-2048:8192}" --output-len-range "${OUT_LEN:-128:256}" \
      --arrival poisson --rate 4 --num-requests "$WARM" --seed 2 --no-progress --no-plots \
      --label "warm-$name" --out "/tmp/warm-$name.json" 2>&1 | grep -E "TTFT|TPOT"
  fi
  python3 -m pdserve.bench.serve --url http://127.0.0.1:8000 --model-path "$M" \
    --input-len-range "${IN:-2048:8192}" --output-len-range "${OUT_LEN:-128:256}" \
    --arrival poisson --sweep-rates "$RATES" --num-requests "$N" --warmup 4 --seed 1 \
    --slo-ttft-ms "${SLO_TTFT_MS:-2000}" --slo-tpot-ms "${SLO_TPOT_MS:-40}" \
    --label "$name" --out "$OUT/serve-v2lite$TAG-$name.json" --no-progress 2>&1 | grep -v Warning
  python3 -m pdserve down 2>&1 | tail -1
done
python3 -m pdserve.bench.serve --compare "$OUT/serve-v2lite$TAG-colocated_2x1.json" "$OUT/serve-v2lite$TAG-1p1d.json" \
  --slo-ttft-ms "${SLO_TTFT_MS:-2000}" --slo-tpot-ms "${SLO_TPOT_MS:-40}" \
  --out "$OUT/serve-v2lite$TAG-pd-vs-colocated.png" 2>&1 | grep -v Warning | tail -30
