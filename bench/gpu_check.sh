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

# Optional, ZERO3=1: the ZeRO-3 + CPU offload size probe (issue 7), up to 8 more minutes (bench/RESULTS.md says how
# to give it a device call of its own). It needs deepspeed, which the image lacks: bench/fetch_gpu_wheels.sh puts it
# in .whl/ (name .whl in the call's carry).
if [ "${ZERO3:-0}" = 1 ]; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
  fi
  timeout 480 python3 bench/zero3_offload.py --budget-s "${ZERO3_BUDGET_S:-420}" --json "$out/zero3_offload.json" 2>&1 \
    | tee "$out/zero3_offload.log"
fi
