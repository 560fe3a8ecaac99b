"""Side jobs of the loop, as callbacks: the first-step blow-up check, evaluation, checkpoints, preemption,
skipped-shard reports, metrics file, W&B, TensorBoard, progress.

The loop calls, on every rank, ``on_train_start(trainer)``, ``on_step_end(trainer, metrics)`` after
each optimizer step (``metrics`` is a dict a callback may add to; later callbacks see the
additions) and ``on_train_end(trainer)``. Callbacks run in list order: the ones that compute
(evaluation) come before the ones that record (files, W&B, progress bar). A callback sees the
trainer through :class:`TrainerView`, not the whole Trainer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from trainer.checkpoint import ModelSpec
    from trainer.config import RunConfig
    from trainer.distributed import DistEnv
    from trainer.objectives import Batch, Objective
    from trainer.strategy import Strategy


class TrainerView(Protocol):
    """What a callback may see and do of the trainer: read the run's parts and the step, evaluate,
    save a checkpoint (the Checkpointer's), ask the loop to stop."""

    cfg: RunConfig
    env: DistEnv
    strategy: Strategy
    model: torch.nn.Module  # the wrapped model
    objective: Objective
    loader: Any
    valid_batches: Callable[[], Iterable[Batch]] | None
    model_spec: ModelSpec
    step: int
    stop_reason: str | None

    def evaluate(self, max_batches: int) -> dict[str, float]: ...

    def save_checkpoint(self) -> Path: ...

    def stop(self, message: str, reason: str) -> None: ...


class Callback:
    def on_train_start(self, trainer: TrainerView) -> None:
        pass

    def on_step_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        pass

    def on_train_end(self, trainer: TrainerView) -> None:
        pass


def default_callbacks(trainer: TrainerView) -> list[Callback]:
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
