"""TensorBoard: every metric of metrics.jsonl as a scalar, same names, in ``<log.dir>/tensorboard``.

``tensorboard --logdir RUN_DIR/tensorboard`` shows them; a resumed run appends to the same directory
(TensorBoard draws the latest value written for a step).
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from trainer.callbacks import Callback, TrainerView

EVENTS_DIR = "tensorboard"


class TensorBoardLogger(Callback):
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / EVENTS_DIR
        self.writer = None

    def on_train_start(self, trainer: TrainerView) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.dir))

    def on_step_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and name != "step":
                self.writer.add_scalar(name, value, trainer.step)

    def on_train_end(self, trainer: TrainerView) -> None:
        self.writer.close()
