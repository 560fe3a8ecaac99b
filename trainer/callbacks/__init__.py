"""Side jobs of the loop, as callbacks: the first-step blow-up check, evaluation, checkpoints, preemption,
skipped-shard reports, metrics file, W&B, TensorBoard, progress.

The loop calls, on every rank, ``on_train_start(trainer)``, ``on_step_end(trainer, metrics)`` after
each optimizer step (``metrics`` is a dict a callback may add to; later callbacks see the
additions) and ``on_train_end(trainer)``. Callbacks run in list order: the ones that compute
(evaluation) come before the ones that record (files, W&B, progress bar).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.loop import Trainer


class Callback:
    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass


def default_callbacks(trainer: Trainer) -> list[Callback]:
    """The callbacks a run gets from its config."""
    from trainer.callbacks.blowup import BlowUpCheck
    from trainer.callbacks.checkpointing import Checkpointing
    from trainer.callbacks.console import ConsoleLog
    from trainer.callbacks.evaluation import Evaluation
    from trainer.callbacks.metrics_file import MetricsFile
    from trainer.callbacks.preemption import Preemption
    from trainer.callbacks.progress import ProgressBar
    from trainer.callbacks.skipped_shards import SkippedShards

    cfg = trainer.cfg
    callbacks: list[Callback] = [BlowUpCheck()]  # before anything saves the weights of a blown-up step
    if cfg.train.eval_every and (cfg.data.valid or cfg.train.eval_tasks):
        callbacks.append(Evaluation(trainer, cfg.train.eval_every, cfg.train.eval_steps, cfg.train.eval_tasks))
    callbacks += [Checkpointing(cfg.checkpoint.every, cfg.checkpoint.save_final), Preemption()]
    if trainer.env.is_main:
        callbacks.append(SkippedShards(cfg.log.dir))  # before the callbacks that record its count
        callbacks.append(MetricsFile(cfg.log.dir / "metrics.jsonl", cfg.log.every))
        if cfg.log.wandb:
            from trainer.callbacks.wandb_logger import WandbLogger

            callbacks.append(WandbLogger(cfg))
        if cfg.log.tensorboard:
            from trainer.callbacks.tensorboard_logger import TensorBoardLogger

            callbacks.append(TensorBoardLogger(cfg.log.dir))
        if cfg.log.progress and sys.stderr.isatty():
            callbacks.append(ProgressBar(cfg.train.max_steps))
        else:  # a log file (SLURM, CI) gets plain lines instead of a redrawn bar
            callbacks.append(ConsoleLog(cfg.log.every))
    return callbacks
