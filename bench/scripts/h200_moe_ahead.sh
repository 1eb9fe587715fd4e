#!/usr/bin/env bash
# The MoE decode's K loops with their tiles loaded ahead into registers (a tile config's AHEAD,
# kernels/moe_k_loops.py), wide tiles and register caps, against the table's pipelined tiles.
# Two GPU calls of under 590 s each: PARTS=tests,ncu, then PARTS=sweep (the default).
#   tests  the MoE kernels' GPU tests (moe_small with AHEAD 1 and 2 and capped registers at
#          every real shape, the grouped GEMM and the tile decode, whose pointers AHEAD's
#          layouts changed), the log in $OUT
#   ncu    Nsight Compute's throughput, warp-state and occupancy sections for the two GEMMs at
#          64 tokens of DeepSeek-V3 (bench.moe_splits, one split), the table's tiles with
#          AHEAD 0, 1 and 2, a text file each in $OUT
#   sweep  h200_moe_down_tiles.sh's sweeps of bench.kernels' SWEEP_FRAGMENT, whose first
#          candidates load ahead, then the wide and the capped ones (deepseek-v3 at 16, 64 and
#          256 tokens with triton_kernels beside, deepseek-v2-lite at 16 and 64), in files
#          tagged -ahead
# Carry .whl and .peers (as h200_moe_down_tiles.sh).
PARTS=${PARTS:-sweep}
source "$(dirname "$0")/gpu_env.sh"
if has tests; then
  stamp tests
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_moe_small_m.py \
    tests/kernels/test_moe_grouped.py tests/kernels/test_mxfp4_tile.py \
    > "$OUT/moe-ahead-tests-${GPU}${TAG}.log" 2>&1
  tail -3 "$OUT/moe-ahead-tests-${GPU}${TAG}.log"
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
