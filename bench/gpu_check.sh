#!/usr/bin/env bash
# One prepared GPU run (see bench/RESULTS.md): kernel parity tests, then the side-by-side benchmark.
# Usage on the GPU machine, from the repository root:  bash bench/gpu_check.sh [bench args...]
# Sized for one device call of under 10 minutes: tests ≤ 4 min, benchmark rows started within 4 min
# (bench/gpu_train.py --budget-s; a row in flight may finish after). Wheels the image lacks
# (bench/fetch_gpu_wheels.sh → .whl/, named in the call's carry) are installed first: liger-kernel
# for the Liger rows and tests, deepspeed for the ZeRO-3 probe.
# Output lands in ${OUT:-out}/ (device.txt, gpu_tests.log, gpu_train.json/.log, zero3_offload.json/.log).
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

# ZERO3=1 runs only the ZeRO-3 + CPU offload size probe (issue 7), in a device call of its own (up to 8 minutes).
if [ "${ZERO3:-0}" = 1 ]; then
  timeout 480 python3 bench/zero3_offload.py --budget-s "${ZERO3_BUDGET_S:-420}" --json "$out/zero3_offload.json" 2>&1 \
    | tee "$out/zero3_offload.log"
  exit
fi
# PARALLEL=1 runs only the multi-GPU rows: tessera-tp (llama-1b, tensor parallel) and tessera-ep (moe-1b,
# expert parallel), one process per GPU over up to 8 GPUs. They are in the default run too; on a machine
# with fewer than 2 GPUs they are reported as skipped, saying so.
if [ "${PARALLEL:-0}" = 1 ]; then
  timeout 540 python3 bench/gpu_train.py --modes tessera-tp,tessera-ep --workloads llama-1b,moe-1b \
    --budget-s "${BENCH_BUDGET_S:-420}" --json "$out/gpu_train_parallel.json" "$@" 2>&1 | tee "$out/gpu_train_parallel.log"
  exit
fi
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/model/test_gpu_kernels.py 2>&1 | tee "$out/gpu_tests.log"
# The trainer tests start their ranks with multiprocessing "spawn" (CUDA cannot be used in a child forked
# after its parent initialised it) and run in a process of their own, apart from the kernel tests.
DS_ACCELERATOR=cuda PYTORCH_NVML_BASED_CUDA_CHECK=1 timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/distributed/test_gpu_training.py 2>&1 | tee -a "$out/gpu_tests.log"
timeout 300 python3 bench/gpu_train.py --budget-s "${BENCH_BUDGET_S:-240}" --json "$out/gpu_train.json" "$@" 2>&1 \
  | tee "$out/gpu_train.log"
