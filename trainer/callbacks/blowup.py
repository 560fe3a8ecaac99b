"""Stop at once when the first optimizer step blows the weights up (a learning rate far too high).

The weights' norm is taken before the first step this process runs and after it; when it grew more
than ``FACTOR`` times, or is no longer finite, every rank stops with one line. At a sane learning
rate AdamW's first update is a small fraction of the weights (it moves each by about lr), so only
an absurd lr (``train.lr=1e6``: the weights at ~1e11 after one step) trips it. Costs two passes over
the weights, once per run.
"""

from __future__ import annotations

import math
from typing import Any

from trainer.callbacks import Callback, TrainerView
from trainer.guard import TrainingDiverged

FACTOR = 100.0


class BlowUpCheck(Callback):
    def __init__(self) -> None:
        self.before: float | None = None

    def on_train_start(self, trainer: TrainerView) -> None:
        self.before = trainer.strategy.weight_norm()

    def on_step_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if self.before is None or metrics["skipped"]:
            return
        before, self.before = self.before, None  # the first applied step only
        after = trainer.strategy.weight_norm()
        if not math.isfinite(after) or 0 < before < after / FACTOR:  # no norm to judge by (0): no growth check
            raise TrainingDiverged(
                f"step {trainer.step} blew the weights up: their norm went from {before:.3g} to {after:.3g} "
                f"at lr {metrics['lr']:.3g} (train.lr={trainer.cfg.train.lr:g}); lower train.lr"
            )
