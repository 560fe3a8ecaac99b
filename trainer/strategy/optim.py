"""AdamW with decoupled weight decay on matrices only (not on biases, norms or 1-D parameters)."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            shape = getattr(param, "ds_shape", param.shape)  # a ZeRO-3 partitioned parameter's data is empty
            (decay if len(shape) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW for states on ``device``: torch's fused kernel on CUDA and CPU (on the CPU one pass over
    each tensor instead of foreach's per-op passes: ~10x faster for 200M parameters), foreach elsewhere."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=device.type in ("cuda", "cpu") or None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_step(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor], norm: float, clip: float, lr: float,
                  skip: bool) -> float:
    """``clip_grad_norm_``'s scaling by a norm the strategy computed over its shards, then the step unless
    skipped or the norm is not finite; gradients cleared either way. Returns the norm."""
    limit = clip if clip > 0 else math.inf
    if math.isfinite(norm) and norm > limit:
        torch._foreach_mul_(grads, limit / (norm + 1e-6))
    if not skip and math.isfinite(norm):
        set_lr(optimizer, lr)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
