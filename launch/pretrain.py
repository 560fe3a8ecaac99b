"""Pretraining (CLM, MLM or span corruption, as model.arch implies), one rank.

`python -m launch.pretrain --config FILE [section.key=value ...]`
runs unchanged alone, under torchrun, the deepspeed launcher, `accelerate launch` or srun.
"""

import sys

from launch.entry import main

if __name__ == "__main__":
    sys.exit(main("pretrain"))
