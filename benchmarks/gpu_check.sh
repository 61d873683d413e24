#!/usr/bin/env bash
# Issue 3's GPU measurements in one command, < 7 minutes on an H100 with model construction; installs nothing.
# Run from anywhere: benchmarks/gpu_check.sh [gpu_check.py options]. Prints tables; writes gpu_check.json and
# gpu_check_warm.json to $OUT when it is set. diffusers is compared only when it is importable.
#   1. plain eager (+ diffusers) -> fast path eager -> fp32 VAE decode -> eager batches -> 1024 px eager ->
#      compiled (reduce-overhead: CUDA graphs) -> compiled batches -> bf16 VAE precision
#   2. a fresh process: time to the first compiled image with the compile cache that step 1 filled
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/sdturbo-inductor}"
PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
timeout 350 "$PYTHON" benchmarks/gpu_check.py --budget-s 330 "$@"
echo "gpu_check.py exit status $?"
timeout 60 "$PYTHON" benchmarks/gpu_check.py --warm-start "$@"
echo "gpu_check.py --warm-start exit status $?"
