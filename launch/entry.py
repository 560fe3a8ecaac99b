"""What ``python -m launch.pretrain|sft|align`` and ``tessera pretrain|sft|align`` share.

Each rank parses ``--config FILE [section.key=value ...]``, maps its launcher's variables onto
torchrun's (:mod:`launch.env`) and calls ``trainer.run.run``. ``tessera ... --nproc N`` starts N
local ranks of the same module first (:mod:`launch.local`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import load_config
from common.errors import UserError, exit_status
from launch import env, local


def add_arguments(parser: argparse.ArgumentParser, nproc: bool) -> None:
    """--config, the overrides and (for the tessera CLI) --nproc."""
    parser.add_argument("--config", type=Path, help="YAML recipe (optional: defaults + overrides also run)")
    if nproc:
        parser.add_argument("--nproc", type=int, default=1, metavar="N",
                            help="start N local processes (gloo on CPU, nccl on GPUs), like torchrun")
    else:  # the DeepSpeed launcher appends --local_rank=N; LOCAL_RANK carries the same
        parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def load(config: Path | None, overrides: list[str], task: str | None = None):
    """The validated RunConfig: defaults ← ``config`` ← ``overrides``, checked for ``task`` if given."""
    from trainer.config import RunConfig

    cfg = load_config(RunConfig, config, overrides)
    if task is not None:
        cfg.check_task(task)
    return cfg


def train(task: str, config: Path | None, overrides: list[str]) -> None:
    """One rank of a run: config first (cheap to get wrong), then the rendezvous, then training."""
    cfg = load(config, overrides, task)
    with env.launched() as dist:
        if dist.world_size > 1:
            print(f"tessera {task}: {dist.describe()}", file=sys.stderr, flush=True)
        from torch.distributed import DistStoreError

        from trainer.run import run

        try:
            run(cfg, task)
        except DistStoreError as exc:  # the store is only used to meet: the others never came
            raise UserError(
                f"rendezvous at {dist.master_addr}:{dist.master_port} failed: {str(exc).splitlines()[0]} "
                f"(are all {dist.world_size} ranks started? train.dist_timeout_s sets the wait)"
            ) from None


def entry_args(config: Path | None, overrides: list[str]) -> list[str]:
    """Arguments that make ``python -m launch.<task>`` run the same config from any directory."""
    return ([f"--config={config.resolve()}"] if config else []) + list(overrides)


def command(args: argparse.Namespace, task: str) -> int:
    """``tessera pretrain|sft|align``: in this process, or ``--nproc`` local ranks of launch.<task>."""
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc == 1:
        train(task, args.config, args.overrides)
        return 0
    load(args.config, args.overrides, task)  # a bad config fails here with one line, not once per rank
    return local.spawn(f"launch.{task}", entry_args(args.config, args.overrides), args.nproc)


def main(task: str, argv: list[str] | None = None) -> int:
    """``python -m launch.<task>``: one rank under torchrun, deepspeed, accelerate, srun or alone."""
    parser = argparse.ArgumentParser(prog=f"python -m launch.{task}", description=f"Tessera {task}, one rank.")
    add_arguments(parser, nproc=False)
    args = parser.parse_intermixed_args(argv)
    return exit_status(f"tessera {task}", lambda: train(task, args.config, args.overrides))
