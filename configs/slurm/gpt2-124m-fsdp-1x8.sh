#!/usr/bin/env bash
# GPT-2 124M with FSDP2 on one node × 8 GPUs: global batch 512 = 16 per GPU × 8 GPUs × 4
# accumulation steps.
# Renders the sbatch script (prints it); add --submit to queue it, --out FILE to keep it, and your
# site's --partition/--account/--qos. Any section.key=value after the flags overrides the recipe.
#   bash configs/slurm/gpt2-124m-fsdp-1x8.sh --partition gpu --account myproj --submit
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec "${TESSERA:-tessera}" slurm --config "$root/configs/pretrain/gpt2-124m-fsdp.yaml" --nodes 1 --gpus-per-node 8 --time 12:00:00 --cpus-per-task 64 --mem 0 "$@"
