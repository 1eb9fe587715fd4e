#!/usr/bin/env bash
# GPU session: the GPU tests of the KV transport, TP=2 (decode graphs with the NCCL
# communicator), the engine and kernels, 1P1D; then the KV transfer bench between two GPUs.
# Run from the repo root on the two-H200 machine with the Ray wheels in .whl (see README).
set -u
export PYTHONPATH=/tmp/site:. NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-bench/results}
[ -d /tmp/site/ray ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
TESTS=${TESTS:-tests/cluster/test_kv_transport.py tests/cluster/test_tensor_parallel.py tests/cluster/test_engine_gpu.py tests/e2e/test_cluster_gpu.py}
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -x $TESTS 2>&1 | grep -v Warn | tail -25
python3 -m bench.kv_transfer --tokens ${TOKENS:-1024,4096,8192,16384,32768} --iters 7 \
  --out "$OUT/kv-transfer-NVIDIA_H200.json" 2>&1 | grep -v Warning | tail -12
