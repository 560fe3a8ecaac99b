"""Feed-forward block: plain GELU, or gated (SwiGLU / GeGLU) with one fused gate+up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import kernels
from model.config import Kernels, Mlp, ModelConfig


class MLP(nn.Module):
    """``down(act(up(x)))``; gated variants compute ``down(act(gate(x)) * up(x))``.

    For gated MLPs ``up`` holds gate and up stacked (gate first), so one matmul does both.
    """

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None) -> None:
        """``d_ff`` defaults to ``cfg.d_ff`` (an MoE's shared expert has its own size)."""
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.gated = cfg.mlp != Mlp.gelu
        self.act = activation(cfg)
        liger = {Mlp.swiglu: kernels.swiglu, Mlp.geglu: kernels.geglu_tanh if cfg.gelu_tanh else None}.get(cfg.mlp)
        self.liger = liger if cfg.kernels == Kernels.liger else None  # the fused act(gate) * up, where Liger has one
        self.up = nn.Linear(cfg.d_model, d_ff * (2 if self.gated else 1), bias=cfg.bias)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # through the module: ZeRO-3 gathers its weight only for its own forward
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            if kernels.use_liger(self.liger is not None, x):
                return self.down(self.liger(gate, up))
            return self.down(self.act(gate) * up)
        return self.down(self.act(h))


def activation(cfg: ModelConfig):
    """The MLP's nonlinearity (applied to the gate of gated MLPs): SiLU for swiglu, else GELU."""
    return F.silu if cfg.mlp == Mlp.swiglu else _gelu(cfg.gelu_tanh)


def _gelu(tanh: bool):
    approximate = "tanh" if tanh else "none"
    return lambda x: F.gelu(x, approximate=approximate)
