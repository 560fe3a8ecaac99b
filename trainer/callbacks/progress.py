"""A tqdm progress bar on rank 0: loss, tokens/s and the ETA."""

from __future__ import annotations

from typing import Any

from trainer.callbacks import Callback, TrainerView


class ProgressBar(Callback):
    def __init__(self, total: int) -> None:
        self.total = total
        self.bar = None

    def on_train_start(self, trainer: TrainerView) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=trainer.step, unit="step", dynamic_ncols=True)

    def on_step_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        self.bar.update(trainer.step - self.bar.n)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)

    def on_train_end(self, trainer: TrainerView) -> None:
        self.bar.close()
