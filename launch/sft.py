"""Instruction tuning on conversations, one rank.

`python -m launch.sft --config FILE [section.key=value ...]`
runs unchanged alone, under torchrun, the deepspeed launcher, `accelerate launch` or srun.
"""

import sys

from launch.entry import main

if __name__ == "__main__":
    sys.exit(main("sft"))
