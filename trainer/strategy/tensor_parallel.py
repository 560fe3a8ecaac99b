"""Tensor parallel (``parallel.tp`` > 1, with train.strategy=ddp), Megatron-style, on a (dp, tp) mesh.

The ``tp`` ranks of a group read the same batch. Each holds its share of every block's attention
heads (its rows of the fused q/k/v projection, its columns of the output projection) and of the
MLP's hidden units (its rows of gate/up, its columns of down); embeddings, norms and the LM head are
replicated. Around each split pair, ``copy_to_tp`` (identity forward, all-reduce backward) and
``reduce_from_tp`` (all-reduce forward, identity backward) keep the replicated activations and
their gradients whole on every rank. A split tensor's gradient comes from its group's one batch:
summed over its dp replicas it is divided by dp. Gradient sync, norms and whole-tensor checkpoints:
:mod:`trainer.strategy.partitioned`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from model.attention import Attention
from model.config import Pos
from model.mlp import MLP
from trainer.strategy.partitioned import Partitioned


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ColumnParallel(nn.Module):
    """Some output rows of a linear layer; its input's gradient is summed over the tp group."""

    def __init__(self, linear: nn.Linear, rows: list[torch.Tensor], strategy: Partitioned) -> None:
        super().__init__()
        self.group = strategy.shard_group
        self.weight = strategy.split(linear.weight, 0, rows)
        self.bias = strategy.split(linear.bias, 0, rows) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToTP.apply(x, self.group), self.weight, self.bias)


class RowParallel(nn.Module):
    """Some input columns of a linear layer; the partial outputs are summed over the tp group, then
    the (replicated) bias is added once."""

    def __init__(self, linear: nn.Linear, cols: list[torch.Tensor], strategy: Partitioned) -> None:
        super().__init__()
        self.group = strategy.shard_group
        self.weight = strategy.split(linear.weight, 1, cols)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _ReduceFromTP.apply(F.linear(x, self.weight), self.group)
        return out + self.bias if self.bias is not None else out


def _ranges(total: int, parts: int, offset: int = 0) -> list[torch.Tensor]:
    return [offset + r for r in torch.arange(total).split(total // parts)]


def _cat(*per_rank: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat(pieces) for pieces in zip(*per_rank)]


class TensorParallel(Partitioned):
    mesh_dims = ("dp", "tp")

    @property
    def shard_divisor(self) -> int:
        return self.env.world_size // self.size

    def __init__(self, cfg, env, accumulation: int = 1, size: int = 2) -> None:
        super().__init__(cfg, env, accumulation, size)
        self.data_copies = size  # the mesh is (dp, tp), row-major: ranks d·tp … d·tp + tp-1 read batch d

    def parallelize(self, model: nn.Module) -> nn.Module:
        cfg, tp = model.config, self.size
        if self.env.world_size % tp or self.env.local_world_size % tp:
            raise ConfigError(f"parallel.tp={tp} must divide the {self.env.world_size} ranks and the "
                              f"{self.env.local_world_size} per node (a tp group stays inside a node)")
        if cfg.n_heads % tp or cfg.kv_heads % tp or cfg.d_ff % tp:
            raise ConfigError(f"parallel.tp={tp} must divide model.n_heads={cfg.n_heads}, the kv heads "
                              f"({cfg.kv_heads}) and model.d_ff={cfg.d_ff}")
        if cfg.n_experts or cfg.pos in (Pos.alibi, Pos.t5_bias):
            raise ConfigError("parallel.tp splits attention heads and dense MLPs: not for MoE models or per-head "
                              f"score biases (model.pos={cfg.pos})")
        self.make_mesh()
        for module in list(model.modules()):
            if isinstance(module, Attention):
                self._split_attention(module)
            elif isinstance(module, MLP):
                self._split_mlp(module)
        return model

    def _split_attention(self, attn: Attention) -> None:
        tp, hd = self.size, attn.head_dim
        q_dim, kv_dim = attn.n_heads * hd, attn.n_kv_heads * hd
        q, k, v = _ranges(q_dim, tp), _ranges(kv_dim, tp, q_dim), _ranges(kv_dim, tp, q_dim + kv_dim)
        if attn.cross:
            attn.q = ColumnParallel(attn.q, q, self)
            attn.kv = ColumnParallel(attn.kv, _cat(_ranges(kv_dim, tp), _ranges(kv_dim, tp, kv_dim)), self)
        else:
            attn.qkv = ColumnParallel(attn.qkv, _cat(q, k, v), self)
        attn.out = RowParallel(attn.out, q, self)
        attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp

    def _split_mlp(self, mlp: MLP) -> None:
        tp, d_ff = self.size, mlp.down.in_features
        rows = _cat(_ranges(d_ff, tp), _ranges(d_ff, tp, d_ff)) if mlp.gated else _ranges(d_ff, tp)
        mlp.up = ColumnParallel(mlp.up, rows, self)
        mlp.down = RowParallel(mlp.down, _ranges(d_ff, tp), self)
