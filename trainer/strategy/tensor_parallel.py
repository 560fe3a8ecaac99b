"""Tensor parallel (``parallel.tp`` > 1, with train.strategy ddp or fsdp), Megatron-style, on a (dp, tp) mesh.

The ``tp`` ranks of a group read the same batch. Each holds its share of every block's attention
heads (its rows of the fused q/k/v projection, its columns of the output projection) and of the
MLP's hidden units (its rows of gate/up, its columns of down); with ``parallel.vocab_parallel`` (the
default) its rows of the token embeddings and the LM head (:mod:`trainer.strategy.vocab_parallel`);
norms (and without vocab parallel, the embeddings and head) are replicated. Around each split pair,
``copy_to_tp`` (identity forward, all-reduce backward) and ``reduce_from_tp`` (all-reduce forward,
identity backward; both in :mod:`trainer.strategy.tp_collectives`) keep the replicated activations and
their gradients whole on every rank.

With ``parallel.sequence_parallel`` (Megatron-SP), the activations between the split pairs (norms,
residual adds, dropout) hold only this rank's slice of the sequence: each stack's first block takes
its slice, attention and MLP all-gather the sequence on the way in and reduce-scatter it on the way
out (in place of the all-reduce), and each stack's last block gathers it back, so the final norm,
head and loss see whole sequences. Norm weights then get part of their gradient on each tp rank
(:class:`~trainer.strategy.partitioned.Layout` ``partial``), as q/k norms always do (they see some heads).
Forwards without gradients (evaluation, generation, which decodes one token at a time) save no
activations and run as plain tp.

The model's fused q/k/v and gate/up projections are why this is not DTensor's ``ColwiseParallel``:
that shards rows contiguously, handing rank 0 all of q, and a layout that shards well (torchtitan's
``FusedQKVLinear``, head-major per kv group) would change model/ and its checkpoints. With
``train.strategy=fsdp`` FSDP2 shards the tp-split blocks over the dp sub-mesh. Gradient sync, norms
and checkpoints (each rank's pieces of whole tensors, which reshard across meshes): :mod:`trainer.strategy.partitioned`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from model.attention import Attention
from model.blocks import Block, Stack
from model.mlp import MLP
from trainer.config import ParallelConfig
from trainer.strategy.partitioned import Partitioned, even_ranges
from trainer.strategy.tp_collectives import (
    copy_to_tp,
    gather_sequence,
    reduce_from_tp,
    reduce_scatter_sequence,
    scatter_sequence,
    unscatter_sequence,
)
from trainer.strategy.vocab_parallel import split_vocabulary


def _sequence_split(sequence: bool) -> bool:
    """Whether this forward runs sequence parallel: only with gradients (see the module's docstring)."""
    return sequence and torch.is_grad_enabled()


class ColumnParallel(nn.Module):
    """Some output rows of a linear layer; its input's gradient is summed over the tp group (here,
    or with ``gathered``, by the sequence all-gather in front of the layer)."""

    def __init__(self, linear: nn.Linear, rows: list[torch.Tensor], strategy: Partitioned,
                 gathered: bool = False) -> None:
        super().__init__()
        self.group, self.gathered = strategy.shard_group, gathered
        self.weight = strategy.split(linear.weight, 0, rows)
        self.bias = strategy.split(linear.bias, 0, rows) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if _sequence_split(self.gathered) else copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallel(nn.Module):
    """Some input columns of a linear layer; the partial outputs are summed over the tp group (with
    ``sequence``, into each rank's sequence slice), then the (replicated) bias is added once."""

    def __init__(self, linear: nn.Linear, cols: list[torch.Tensor], strategy: Partitioned,
                 sequence: bool = False) -> None:
        super().__init__()
        self.group, self.sequence = strategy.shard_group, sequence
        self.weight = strategy.split(linear.weight, 1, cols)
        self.bias = linear.bias
        if sequence and self.bias is not None:
            strategy.mark_partial(self.bias)  # added to a slice of the sequence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduce = reduce_scatter_sequence if _sequence_split(self.sequence) else reduce_from_tp
        out = reduce(F.linear(x, self.weight), self.group)
        return out + self.bias if self.bias is not None else out


def _cat(*per_rank: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat(pieces) for pieces in zip(*per_rank)]


class TensorParallel(Partitioned):
    mesh_dims = ("dp", "tp")

    @property
    def shard_divisor(self) -> int:
        return self.env.world_size // self.size

    def __init__(self, cfg, env, accumulation: int = 1, size: int = 2, sequence_parallel: bool = False,
                 vocab_parallel: bool = True) -> None:
        super().__init__(cfg, env, accumulation, size)
        self.data_copies = size  # the mesh is (dp, tp), row-major: ranks d·tp … d·tp + tp-1 read batch d
        self.sequence, self.vocab = sequence_parallel, vocab_parallel
        self.sharded = str(cfg.strategy) == "fsdp"

    def partition(self, model: nn.Module) -> None:
        cfg, tp = model.config, self.size
        if self.env.world_size % tp or self.env.local_world_size % tp:
            raise ConfigError(f"parallel.tp={tp} must divide the {self.env.world_size} ranks and the "
                              f"{self.env.local_world_size} per node (a tp group stays inside a node)")
        ParallelConfig(tp=tp).check_model(cfg)  # refused at load already; a guard for direct callers
        self.make_mesh()
        for module in list(model.modules()):
            if isinstance(module, Attention):
                self._split_attention(module)
            elif isinstance(module, MLP):
                self._split_mlp(module)
        if self.vocab:
            split_vocabulary(model, self)
        if self.sequence:
            self._split_sequence(model)

    def _split_attention(self, attn: Attention) -> None:
        tp, hd, sp = self.size, attn.head_dim, self.sequence
        q_dim, kv_dim = attn.n_heads * hd, attn.n_kv_heads * hd
        q, k, v = even_ranges(q_dim, tp), even_ranges(kv_dim, tp, q_dim), even_ranges(kv_dim, tp, q_dim + kv_dim)
        if attn.cross:
            attn.q = ColumnParallel(attn.q, q, self, gathered=sp)
            attn.kv = ColumnParallel(attn.kv, _cat(even_ranges(kv_dim, tp), even_ranges(kv_dim, tp, kv_dim)), self)
        else:
            attn.qkv = ColumnParallel(attn.qkv, _cat(q, k, v), self, gathered=sp)
        attn.out = RowParallel(attn.out, q, self, sequence=sp)
        attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp
        for norm in (attn.q_norm, attn.k_norm):  # shared by the heads, which are split
            for param in norm.parameters() if norm is not None else ():
                self.mark_partial(param)

    def _split_mlp(self, mlp: MLP) -> None:
        tp, d_ff = self.size, mlp.down.in_features
        rows = _cat(even_ranges(d_ff, tp), even_ranges(d_ff, tp, d_ff)) if mlp.gated else even_ranges(d_ff, tp)
        mlp.up = ColumnParallel(mlp.up, rows, self, gathered=self.sequence)
        mlp.down = RowParallel(mlp.down, even_ranges(d_ff, tp), self, sequence=self.sequence)

    def _split_sequence(self, model: nn.Module) -> None:
        """Hooks (the model is left as written): each stack's blocks run on sequence slices, their
        attention and MLP on whole sequences; the blocks' norms see slices."""
        group = self.shard_group

        def first_arg(exchange: Callable) -> Callable:
            return lambda module, args: (exchange(args[0], group), *args[1:]) if _sequence_split(True) else None

        for stack in [m for m in model.modules() if isinstance(m, Stack)]:
            stack.layers[0].register_forward_pre_hook(first_arg(scatter_sequence))
            stack.layers[-1].register_forward_hook(
                lambda module, args, out: unscatter_sequence(out, group) if _sequence_split(True) else None)
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            for inner in (block.attn, block.cross_attn, block.mlp):
                if inner is not None:
                    inner.register_forward_pre_hook(first_arg(gather_sequence))
            for norm in (block.attn_norm, block.cross_norm, block.mlp_norm):
                for param in norm.parameters() if norm is not None else ():
                    self.mark_partial(param)
