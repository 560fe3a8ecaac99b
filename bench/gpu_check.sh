#!/usr/bin/env bash
# One prepared GPU run (see bench/RESULTS.md): kernel parity tests, then the side-by-side benchmark.
# Usage on the GPU machine, from the repository root:  bash bench/gpu_check.sh [bench args...]
# Output lands in ${OUT:-out}/ (gpu_tests.log, gpu_train.json, gpu_train.log).
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/model/test_gpu_kernels.py 2>&1 | tee "$out/gpu_tests.log"
timeout 420 python3 bench/gpu_train.py --json "$out/gpu_train.json" "$@" 2>&1 | tee "$out/gpu_train.log"
