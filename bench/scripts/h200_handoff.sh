#!/usr/bin/env bash
# GPU call (under 600 s): where 1P1D's TTFT goes at low load, and colocated's first run at a new
# rate against a second run of the same trace. 1P1D at 0.5 req/s, then the decode pool's handoff
# phases from /metrics (pdserve_handoff_seconds: prefill call, the prefill replica's share, KV
# after the result, joining the decode batch); colocated 2x1 at 2 req/s twice in a row.
source "$(dirname "$0")/gpu_env.sh"
[ -f "$M/config.json" ] || python3 -m pdserve make-model --preset deepseek-v2-lite --mxfp4 --out "$M" > /dev/null
bench() {
  python3 -m pdserve.bench.serve --url http://127.0.0.1:8000 --model-path "$M" --input-len-range 2048:8192 \
    --output-len-range 128:256 --arrival poisson --num-requests "$2" --warmup 4 --seed "$3" \
    --slo-ttft-ms 1000 --slo-tpot-ms 40 --no-progress --no-plots --rate "$1" \
    --label "$4" --out "$OUT/serve-v2lite-$4.json" 2>&1 | grep -v Warning | grep -E "==|TTFT|TPOT|goodput"
}
for name in 1p1d colocated_2x1; do
  # the prefix cache off: the colocated runs repeat one trace, which would find it cached
  python3 - "$M" "deploy/configs/deepseek_v2_lite_${name}_gpu.yaml" "/tmp/$name.yaml" <<'PY'
import sys, yaml
model, src, dst = sys.argv[1:]
cfg = yaml.safe_load(open(src))
args = cfg["applications"][0]["args"]
args["model"]["path"] = model
for pool in ("prefill", "decode"):
    if args.get(pool) is not None:
        args[pool]["prefix_caching"] = False
yaml.safe_dump(cfg, open(dst, "w"))
PY
  timeout 200 python3 -m pdserve up -c "/tmp/$name.yaml" 2>&1 | grep -v Warning | tail -1
  if [ "$name" = 1p1d ]; then
    bench 0.5 24 1 1p1d-low-load
    python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/metrics').read().decode())" \
      | grep -E "handoff_seconds_(sum|count)|time_to_first_token_seconds_(sum|count)" | tee "$OUT/handoff-metrics.txt"
  else
    bench 2 24 2 colocated-2rps-first
    bench 2 24 2 colocated-2rps-second
  fi
  python3 -m pdserve down 2>&1 | tail -1
done
