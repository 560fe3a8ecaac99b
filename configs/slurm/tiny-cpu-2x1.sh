#!/usr/bin/env bash
# The tiny CPU recipe on 2 CPU nodes × 1 process (gloo, DDP), e.g. on the local test cluster of
# tests/slurm-local-cluster.sh. Make its shards first (make demo).
# Renders the sbatch script (prints it); add --submit to queue it, --out FILE to keep it, and your
# site's --partition/--account/--qos. Any section.key=value after the flags overrides the recipe.
#   bash configs/slurm/tiny-cpu-2x1.sh --submit
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec "${TESSERA:-tessera}" slurm --config "$root/configs/pretrain/tiny-cpu.yaml" --nodes 2 --gpus-per-node 0 --time 30 "$@" train.strategy=ddp
