"""Weights & Biases: project, run name, group, tags and the resolved config; offline without an API key.

``WANDB_MODE`` wins when set (``disabled`` starts nothing); otherwise the run is online only when
``WANDB_API_KEY`` is present. The key itself is never read into our logs.
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING, Any

from trainer.callbacks import Callback, TrainerView

if TYPE_CHECKING:
    from trainer.config import RunConfig


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


class WandbLogger(Callback):
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run = None

    def on_train_start(self, trainer: TrainerView) -> None:
        import wandb

        log = self.cfg.log
        log.dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=log.wandb_project,
            name=log.wandb_run_name,
            group=log.wandb_group,
            tags=log.wandb_tags or None,
            config=self.cfg.to_dict(),
            dir=str(log.dir),
            mode=wandb_mode(),
            resume="allow",
            id=_run_id(log.dir),
        )

    def on_step_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=trainer.step)

    def on_train_end(self, trainer: TrainerView) -> None:
        self.run.finish()


def _run_id(run_dir: Any) -> str:
    """One W&B run per run directory, so a resumed (requeued) job continues the same run."""
    path = run_dir / "wandb_run_id"
    if not path.exists():
        path.write_text(secrets.token_hex(4))  # W&B ids: 8 lowercase alphanumerics
    return path.read_text().strip()
