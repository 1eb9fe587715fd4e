#!/usr/bin/env bash
# On two H200s: the multi-turn chat trace (pdserve bench --conversations) against 1 prefill + 1 decode of
# DeepSeek-V2-Lite's shape, weights drawn at load (no checkpoint), KV over NCCL, with the prefix
# cache on and then off on both pools: prompt tokens computed, KV bytes moved and held by
# decode, TTFT. ONE_GPU=1: both pools share one GPU, KV over Ray's object store. Env: CONV
# (conversations, default 16), TURNS (4), SYSTEM (system prompt tokens, 2048), USER_LEN (64),
# ANSWER (128), TAG (names the files).
source "$(dirname "$0")/gpu_env.sh"
CFG=/tmp/cfg-deepseek-v2-lite
LAYOUT=gpu NAME=${GPU,,}-v2lite-1p1d
[ "${ONE_GPU:-0}" = 1 ] && LAYOUT=one_gpu NAME="${GPU,,}-v2lite-1p1d-one-gpu"
[ -f "$CFG/config.json" ] || python3 -m pdserve make-model --preset deepseek-v2-lite --config-only --out "$CFG" > /dev/null
for cache in on off; do
  flag=$([ "$cache" = on ] && echo true || echo false)
  sed -e "s#path: /data/dsv2-lite#path: $CFG\n        random_weights_seed: 0#" \
      -e "s#max_num_batched_tokens: 16384#max_num_batched_tokens: 16384\n        prefix_caching: $flag#" \
      -e "s#max_num_seqs: 256#max_num_seqs: 256\n        prefix_caching: $flag#" \
      "deploy/configs/deepseek_v2_lite_1p1d_${LAYOUT}.yaml" > "/tmp/conv-$cache.yaml"
  stamp "up, cache $cache"
  timeout 300 python3 -m pdserve up -c "/tmp/conv-$cache.yaml" 2>&1 | grep -v Warning | tail -2
  stamp "trace, cache $cache"
  timeout 400 python3 -m pdserve bench --url http://127.0.0.1:8000 \
    --conversations "${CONV:-16}" --turns "${TURNS:-4}" --system-len "${SYSTEM:-2048}" \
    --user-len "${USER_LEN:-64}" --output-len "${ANSWER:-128}" --label "${NAME}${TAG}-cache-$cache" \
    --out "$OUT/conversations-${NAME}${TAG}-cache-$cache.json" \
    2>&1 | grep -v Warning | tail -14
  python3 -m pdserve down 2>&1 | tail -1
done
stamp done
