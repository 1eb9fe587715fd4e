#!/usr/bin/env bash
# Where 1P1D's time to first token goes, on this machine: deploy CONFIG (default: the tiny
# 1P1D on a local Ray), warm it up, then load it and report the decode pool's handoff phases
# over the loaded requests only. Env: CONFIG, RATE, N, IN, OUT_LEN, LABEL.
set -eu
CONFIG=${CONFIG:-deploy/configs/tiny_1p1d.yaml}
OUT=${OUT:-bench/results}
LABEL=${LABEL:-cpu-tiny-1p1d}
python -m pdserve up -c "$CONFIG" 2>&1 | grep -v Warning | tail -1
load() {
  python -m pdserve.bench.serve --url http://127.0.0.1:8000 --input-len "${IN:-256}" --output-len "${OUT_LEN:-4}" \
    --rate "${RATE:-2}" --num-requests "$1" --seed "$2" --no-progress --no-plots --label "$LABEL" \
    --out "/tmp/handoff-load-$2.json" ${VOCAB:+--vocab-size "$VOCAB"} 2>&1 | grep -E "requests|TTFT"
}
load 8 0  # warm-up, not counted
python -m pdserve.bench.handoff --save /tmp/handoff-base.txt
load "${N:-40}" 1
python -m pdserve.bench.handoff --since /tmp/handoff-base.txt --out "$OUT/handoff-$LABEL.json"
python -m pdserve down 2>&1 | tail -1
