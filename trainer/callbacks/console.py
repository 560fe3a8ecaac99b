"""One log line every ``log.every`` steps on rank 0, for logs that are files (SLURM), not terminals."""

from __future__ import annotations

import logging
from typing import Any

from trainer.callbacks import Callback, TrainerView

log = logging.getLogger("tessera.trainer")


class ConsoleLog(Callback):
    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if trainer.step % self.every and "eval/loss" not in metrics:
            return
        evaluation = f" | eval loss {metrics['eval/loss']:.4f}" if "eval/loss" in metrics else ""
        log.info(
            "step %d/%d | loss %.4f | lr %.3g | grad norm %.3g | %.0f tokens/s%s",
            trainer.step, trainer.cfg.train.max_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
            metrics["tokens_per_s"], evaluation,
        )
