#!/usr/bin/env bash
# GRPO of Llama 1B on 1 node × 8 GPUs (srun torchrun, FSDP; rollouts on the sharded policy):
# global batch 64 prompts = 4 per GPU × 8 GPUs × 2 accumulation steps, 8 completions each.
# Needs the SFT run and the prompt shards the align recipe names (configs/align/llama-1b-grpo.yaml).
# Renders the sbatch script (prints it); add --submit to queue it, --out FILE to keep it, and your
# site's --partition/--account/--qos. Any section.key=value after the flags overrides the recipe.
#   bash configs/slurm/llama-1b-grpo-1x8.sh --partition gpu --account myproj --submit
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec "${TESSERA:-tessera}" slurm --task align --config "$root/configs/align/llama-1b-grpo.yaml" --nodes 1 --gpus-per-node 8 --time 1-00:00:00 --cpus-per-task 64 --mem 0 "$@"
