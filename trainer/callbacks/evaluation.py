"""Evaluate every N steps on the first ``eval_steps`` batches of the validation split: the loss, the
objective's own metrics (e.g. ``eval/rewards/accuracies``) and, for token objectives, perplexity."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from data.loader import DATA_OBJECTIVES
from trainer.callbacks import Callback

if TYPE_CHECKING:
    from trainer.loop import Trainer


class Evaluation(Callback):
    def __init__(self, every: int, steps: int) -> None:
        self.every = every
        self.steps = steps

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.step % self.every == 0 or trainer.step == trainer.cfg.train.max_steps:
            values = trainer.evaluate(self.steps)
            metrics.update({f"eval/{name}": value for name, value in values.items()})
            if DATA_OBJECTIVES[trainer.objective.data_objective].token_level:
                metrics["eval/ppl"] = math.exp(min(values["loss"], 50.0))
