#!/usr/bin/env bash
# Llama 1B, FSDP2 sharded in a node and replicated across 4 nodes × 8 GPUs (srun torchrun): global
# batch 1024 = 8 per GPU × 32 GPUs × 4 accumulation steps.
# Renders the sbatch script (prints it); add --submit to queue it, --out FILE to keep it, and your
# site's --partition/--account/--qos. Any section.key=value after the flags overrides the recipe.
#   bash configs/slurm/llama-1b-hsdp-4x8.sh --partition gpu --account myproj --submit
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec "${TESSERA:-tessera}" slurm --config "$root/configs/pretrain/llama-1b-hsdp.yaml" --nodes 4 --gpus-per-node 8 --time 2-00:00:00 --cpus-per-task 96 --mem 0 "$@"
