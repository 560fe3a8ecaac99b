"""Learning-rate schedules with linear warmup: cosine, linear, WSD (warmup-stable-decay), constant."""

from __future__ import annotations

import math

from trainer.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = cfg.lr - cfg.min_lr
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, round(cfg.max_steps * (1 - cfg.decay_fraction)))
        if step < decay_start:
            return cfg.lr
        return cfg.lr - span * (step - decay_start + 1) / max(1, cfg.max_steps - decay_start)
    progress = (step - cfg.warmup_steps + 1) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr - span * progress
    return cfg.min_lr + span * 0.5 * (1 + math.cos(math.pi * progress))
