#!/usr/bin/env bash
# One GPU call (under 600 s): our MXFP4 MoE kernels against FlashInfer's SM90 CUTLASS MoE and
# OpenAI's triton_kernels (the MoE vLLM runs on Hopper) on the same GPU, in the same run
# (bench.kernels, MoE rows). Carry .whl, .fi/fisite.txz (flashinfer_bundle.sh) and .peers (a
# copy of ../shared/peers/triton_kernels-v3.6.0 in a git-ignored folder: the peers travel only
# with the call, never into the product).
export PYTHONPATH=$PWD/.peers/triton_kernels-v3.6.0${PYTHONPATH:+:$PYTHONPATH}
source "$(dirname "$0")/gpu_env.sh"
flashinfer_site
stamp peers
PYTHONPATH=$PYTHONPATH:. timeout 520 python3 -m pdserve.bench.kernels --parts moe_decode,moe_prefill \
  --budget-s 300 --json "$OUT/kernels-peers-${GPU}${TAG}.json" 2>&1 \
  | grep -v -i "warn\|autotuner" | tail -40
stamp done
