"""Normalisation layers: LayerNorm and RMSNorm (statistics in fp32, as Llama and T5 do)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import kernels
from model.config import Kernels, ModelConfig, Norm


class RMSNorm(nn.Module):
    """Root-mean-square norm without mean subtraction or bias."""

    def __init__(self, dim: int, eps: float, liger: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.liger = liger
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.use_liger(self.liger, x):
            return kernels.rms_norm(x, self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm ``cfg.norm`` over ``d_model`` (LayerNorm carries a bias when ``cfg.bias``)."""
    if cfg.norm == Norm.rmsnorm:
        return RMSNorm(cfg.d_model, cfg.norm_eps, liger=cfg.kernels == Kernels.liger)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
