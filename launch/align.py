"""Alignment on preference pairs (DPO, IPO, cDPO, SimPO, ORPO), one rank.

`python -m launch.align --config FILE [section.key=value ...]`
runs unchanged alone, under torchrun, the deepspeed launcher, `accelerate launch` or srun.
"""

import sys

from launch.entry import main

if __name__ == "__main__":
    sys.exit(main("align"))
