"""Shards left out as corrupt (``data.on_corrupt=skip``) are reported, never silent (rank 0).

At the start: one warning line, and the list in ``<log.dir>/skipped_shards.txt`` (one message per
line; a stale list from an earlier run is removed when nothing is skipped). Every metrics line then
carries the count as ``data/skipped_shards``; the run's result holds the list.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trainer.callbacks import Callback, TrainerView

log = logging.getLogger("tessera.trainer")
SKIPPED_SHARDS = "skipped_shards.txt"


class SkippedShards(Callback):
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / SKIPPED_SHARDS
        self.count = 0

    def on_train_start(self, trainer: TrainerView) -> None:
        skipped = trainer.loader.skipped_shards
        self.count = len(skipped)
        if not skipped:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(f"{message}\n" for message in skipped))
        log.warning("data.on_corrupt=skip: %d of %d training shards skipped as corrupt (first: %s); list in %s",
                    self.count, trainer.loader.num_shards, skipped[0], self.path)

    def on_step_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if self.count:
            metrics["data/skipped_shards"] = self.count
