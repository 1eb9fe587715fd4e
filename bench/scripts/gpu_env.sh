# Sourced by the h200_*.sh scripts: the GPU machine's environment (the wheels in /tmp/site:
# Ray's bundle installed on a fresh machine, the project's own wheel, built from this tree by
# `pip wheel --no-deps -w .whl .`, whenever a call carries a new one; NCCL multicast off), OUT
# (results), TAG (file names), M (the model folder, made by each script as it needs) and
# `stamp NAME` (seconds since the start), GPU (the card's model, H200 or H100, naming result
# files: the device machine may lend either), `config_model P` (/tmp/cfg-P, preset P
# config-only), `has PART` (PART among the script's comma-separated PARTS), `left` (seconds of
# BUDGET, default 590, left) and
# `ncu_moe FILE ARGS` (Nsight Compute on the MoE decode's GEMMs). PYTHONSAFEPATH keeps the
# repository root off sys.path (the project imports as pdserve.*, never by its folders' names).
# A PYTHONPATH given to a script is kept after /tmp/site (a folder holding a sitecustomize.py
# then changes every process of a deployment).
set -u
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-bench/results}
TAG=${TAG:-}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oE 'H[0-9]{3}' || echo GPU)
M=${MODEL:-/tmp/dsv2-lite}
S=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - S ))s"; }
has() { [[ ",${PARTS:-}," == *",$1,"* ]]; }  # is phase $1 among the script's PARTS?
left() { echo $(( ${BUDGET:-590} - ($(date +%s) - S) )); }  # seconds of BUDGET (590) left
[ -d /tmp/site/ray ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
for w in .whl/pdserve-*.whl; do  # when carried; a warm machine keeps the last one installed,
  [ -f "$w" ] || continue         # and a script sourced again (or a call repeated) skips it
  sum=$(sha256sum "$w" | cut -d' ' -f1)
  [ "$(cat /tmp/site/.pdserve-wheel 2> /dev/null)" = "$sum" ] && continue
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$w" \
    && echo "$sum" > /tmp/site/.pdserve-wheel
done
flashinfer_site() {
  [ -d /tmp/fisite/flashinfer ] || [ ! -f .fi/fisite.txz ] || python3 -c \
    "import tarfile; tarfile.open('.fi/fisite.txz').extractall('/tmp', filter='tar')"
  [ -d /tmp/fisite/flashinfer ] && export PYTHONPATH=$PYTHONPATH:/tmp/fisite \
    FLASHINFER_WORKSPACE_BASE=/tmp/fi-jit MAX_JOBS=16
  return 0
}
config_model() {  # /tmp/cfg-$1: preset $1's config and tokenizer (weights drawn at load), once
  [ -f "/tmp/cfg-$1/config.json" ] || python3 -m pdserve make-model --preset "$1" --config-only \
    --out "/tmp/cfg-$1" > /dev/null
}
ncu_moe() {  # ncu_moe FILE ARGS: Nsight Compute's throughput, scheduler, warp-state, occupancy
  # and memory sections for the MoE decode's two GEMMs at 64 tokens (bench.moe_splits, one
  # split, ARGS added: --models, --ahead) into FILE; its headline lines printed
  local f=$1 ncu
  shift
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2> /dev/null | head -1)
  [ -z "$ncu" ] && { echo "no ncu on this machine"; return 1; }
  timeout 150 "$ncu" --clock-control none --section SpeedOfLight --section SchedulerStats \
    --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
    -k regex:'_gemm[12]_kernel' --launch-count 2 python3 -m pdserve.bench.moe_splits --m 64 \
    --splits 1 --no-launches --out /tmp/moe-splits-ncu.json "$@" > "$f" 2>&1
  grep -E "^  _gemm|DRAM Throughput|Issue Slots Busy|No Eligible|Achieved Occupancy" "$f" | head -12
}
