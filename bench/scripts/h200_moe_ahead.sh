#!/usr/bin/env bash
# One GPU call (under 560 s): the MoE decode's K loops with their tiles loaded ahead into
# registers (a tile config's AHEAD, kernels/moe_k_loops.py) against Triton's pipelined loops.
# First the MoE kernels' GPU tests (moe_small with AHEAD 1 and 2 at every real shape, the
# grouped GEMM and the tile decode, whose pointers AHEAD's layouts changed), then
# h200_moe_down_tiles.sh's sweeps of bench.kernels' SWEEP_FRAGMENT, whose first candidates
# load ahead (deepseek-v3 at 16, 64 and 256 tokens with triton_kernels beside, deepseek-v2-lite
# at 16 and 64), in files tagged -ahead. Carry .whl and .peers (as h200_moe_down_tiles.sh).
source "$(dirname "$0")/gpu_env.sh"
stamp tests
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_moe_small_m.py \
  tests/kernels/test_moe_grouped.py tests/kernels/test_mxfp4_tile.py \
  > "$OUT/moe-ahead-tests-${GPU}${TAG}.log" 2>&1
tail -3 "$OUT/moe-ahead-tests-${GPU}${TAG}.log"
BUDGET=$(( $(left) - 40 )) TAG=${TAG}-ahead bash "$(dirname "$0")/h200_moe_down_tiles.sh"
