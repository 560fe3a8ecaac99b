#!/usr/bin/env bash
# Llama 3 8B, tensor parallel over the 8 GPUs of each node and FSDP2 across 4 nodes (srun torchrun):
# mesh dp=4 × tp=8; global batch 256 = 4 per tp group × 4 groups × 16 accumulation steps.
# Renders the sbatch script (prints it); add --submit to queue it, --out FILE to keep it, and your
# site's --partition/--account/--qos. Any section.key=value after the flags overrides the recipe.
#   bash configs/slurm/llama3-8b-tp8-fsdp-4x8.sh --partition gpu --account myproj --submit
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec "${TESSERA:-tessera}" slurm --config "$root/configs/pretrain/llama3-8b-tp8-fsdp.yaml" --nodes 4 --gpus-per-node 8 --time 2-00:00:00 --cpus-per-task 96 --mem 0 "$@"
