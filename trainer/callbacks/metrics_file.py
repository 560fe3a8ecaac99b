"""metrics.jsonl in the run directory: one JSON object per logged step (rank 0 writes it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainer.callbacks import Callback, TrainerView


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsFile(Callback):
    def __init__(self, path: Path, every: int) -> None:
        self.path = path
        self.every = every

    def on_train_start(self, trainer: TrainerView) -> None:
        """Keep lines up to the step we (re)start from, so a resumed run's file has no repeats."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= trainer.step]
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def on_step_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if trainer.step % self.every == 0 or trainer.step == trainer.cfg.train.max_steps or "eval/loss" in metrics:
            with self.path.open("a") as f:
                f.write(json.dumps({k: _plain(v) for k, v in metrics.items()}) + "\n")


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # an unreadable (e.g. half-written) line is dropped
