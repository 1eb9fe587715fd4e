#!/usr/bin/env bash
# The MoE decode's K loops with their tiles loaded ahead into registers (a tile config's AHEAD,
# kernels/moe_k_loops.py), wide tiles and register caps, against the table's pipelined tiles.
# On an H100 (2026-12-08) AHEAD 1 ran 3-7% slower than the pipelined loop and no candidate beat
# the table past the run's noise; the MoE GEMMs there were bound by instruction issue, as they
# would be on the H200 at its faster memory, where AHEAD's fewer instructions may pay.
# Two GPU calls of under 590 s each: PARTS=tests,ab,ncu, then PARTS=sweep (the default).
#   tests  the MoE kernels' GPU tests (moe_small with AHEAD 1 and 2 and capped registers at
#          every real shape, the grouped GEMM and the tile decode) and bench.graph_replays',
#          the log in $OUT
#   ab     bench.moe_splits at 16, 64 and 256 tokens of DeepSeek-V3, the table's tiles with
#          AHEAD 0 and 1 alternated twice, triton_kernels beside, a JSON file each in $OUT
#   ncu    Nsight Compute's throughput, warp-state and occupancy sections for the two GEMMs at
#          64 tokens of DeepSeek-V3 (bench.moe_splits, one split), the table's tiles with
#          AHEAD 0, 1 and 2, a text file each in $OUT
#   sweep  h200_moe_down_tiles.sh's sweeps of bench.kernels' SWEEP_FRAGMENT, each candidate
#          timed against the tiles before it (deepseek-v3 at 16, 64 and 256 tokens with
#          triton_kernels beside, deepseek-v2-lite at 16 and 64), in files tagged -ahead
# Carry .whl and .peers (as h200_moe_down_tiles.sh).
export PYTHONPATH=$PWD/.peers/triton_kernels-v3.6.0${PYTHONPATH:+:$PYTHONPATH}
PARTS=${PARTS:-sweep}
source "$(dirname "$0")/gpu_env.sh"
if has tests; then
  stamp tests
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_moe_small_m.py \
    tests/kernels/test_moe_grouped.py tests/kernels/test_mxfp4_tile.py \
    tests/bench/test_graph_replays.py > "$OUT/moe-ahead-tests-${GPU}${TAG}.log" 2>&1
  tail -3 "$OUT/moe-ahead-tests-${GPU}${TAG}.log"
fi
if has ab; then
  for run in a b; do
    for a in 0 1; do
      stamp "AHEAD $a ($run)"
      timeout 80 python3 -m pdserve.bench.moe_splits --models deepseek-v3 --m 16,64,256 \
        --splits 1 --no-launches --ahead $a \
        --out "$OUT/moe-splits-ahead$a-v3-${GPU}${TAG}-$run.json" 2>&1 | grep -E "^deepseek"
    done
  done
fi
if has ncu; then
  for a in 0 1 2; do
    [ "$(left)" -lt 160 ] && { echo "skip ncu AHEAD $a: $(left) s left"; break; }
    stamp "ncu AHEAD $a"
    ncu_moe "$OUT/ncu-moe-ahead$a-v3-m64-${GPU}${TAG}.txt" --models deepseek-v3 --ahead $a || break
  done
fi
if has sweep; then
  BUDGET=$(( $(left) - 40 )) TAG=${TAG}-ahead bash "$(dirname "$0")/h200_moe_down_tiles.sh"
fi
stamp done
