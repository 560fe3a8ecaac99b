#!/usr/bin/env bash
# Llama 1B under DeepSpeed ZeRO-3 on 2 nodes × 8 GPUs, one deepspeed launcher per node with a
# generated hostfile: global batch 512 = 8 per GPU × 16 GPUs × 4 accumulation steps.
# Renders the sbatch script (prints it); add --submit to queue it, --out FILE to keep it, and your
# site's --partition/--account/--qos. Any section.key=value after the flags overrides the recipe.
#   bash configs/slurm/llama-1b-zero3-deepspeed-2x8.sh --partition gpu --account myproj --submit
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec "${TESSERA:-tessera}" slurm --config "$root/configs/pretrain/llama-1b-zero3.yaml" --nodes 2 --gpus-per-node 8 --launcher deepspeed --time 2-00:00:00 --cpus-per-task 96 --mem 0 "$@"
