"""Save a checkpoint every N steps and at the end of training."""

from __future__ import annotations

from typing import Any

from trainer.callbacks import Callback, TrainerView


class Checkpointing(Callback):
    def __init__(self, every: int, save_final: bool) -> None:
        self.every = every
        self.save_final = save_final

    def on_step_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if self.every and trainer.step % self.every == 0:
            trainer.save_checkpoint()

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.save_final and trainer.stop_reason != "error":
            trainer.save_checkpoint()
