"""Evaluate every N steps on the first ``eval_steps`` batches of the validation split: the loss, the
objective's own metrics (e.g. ``eval/rewards/accuracies``) and, for token objectives, perplexity.
The loop itself is :func:`trainer.evaluation.evaluate`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.callbacks import Callback
from trainer.evaluation import perplexity, token_level

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
            if token_level(trainer.objective):
                metrics["eval/ppl"] = perplexity(values["loss"])
