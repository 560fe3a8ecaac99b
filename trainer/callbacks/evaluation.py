"""Evaluate every N steps on the first ``eval_steps`` batches of the validation split: loss, perplexity."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from trainer.callbacks import Callback

if TYPE_CHECKING:
    from trainer.loop import Trainer


class Evaluation(Callback):
    def __init__(self, every: int, steps: int) -> None:
        self.every = every
        self.steps = steps

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.step % self.every == 0 or trainer.step == trainer.cfg.train.max_steps:
            loss = trainer.evaluate(self.steps)
            metrics["eval/loss"] = loss
            metrics["eval/ppl"] = math.exp(min(loss, 50.0))
