"""The autograd collectives of tensor parallel over a tp group: each runs a collective in forward and
its adjoint in backward (Megatron's mappings.py), for whole activations (``copy_to_tp``,
``reduce_from_tp``), sequence-parallel slices (dim 1) and vocabulary shards."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.errors import UserError

Collective = Callable[[torch.Tensor, dist.ProcessGroup], torch.Tensor]


def _identity(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x.view_as(x)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The whole sequence (dim 1) from each rank's slice, in rank order."""
    local = x.transpose(0, 1).contiguous()
    out = local.new_empty(local.shape[0] * dist.get_world_size(group), *local.shape[1:])
    dist.all_gather_into_tensor(out, local, group=group)
    return out.transpose(0, 1)


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's slice of the sequence (dim 1), summed over the group."""
    whole = x.transpose(0, 1).contiguous()
    out = whole.new_empty(whole.shape[0] // dist.get_world_size(group), *whole.shape[1:])
    dist.reduce_scatter_tensor(out, whole, group=group)
    return out.transpose(0, 1)


def _slice(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's slice of the sequence (dim 1)."""
    size, length = dist.get_world_size(group), x.shape[1]
    if length % size:
        raise UserError(f"parallel.sequence_parallel splits each sequence over parallel.tp={size} ranks: a length "
                        f"of {length} does not divide; use a data.seq_len that parallel.tp divides")
    return x.chunk(size, dim=1)[dist.get_rank(group)]


class Exchange(torch.autograd.Function):
    """A collective over the tp group in forward and its adjoint in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, op: Collective, adjoint: Collective):
        ctx.group, ctx.adjoint = group, adjoint
        return op(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.adjoint(grad, ctx.group), None, None, None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Replicated in, replicated out; the input's gradient summed over the group."""
    return Exchange.apply(x, group, _identity, _all_reduce)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Partial sums in, their (replicated) sum out."""
    return Exchange.apply(x, group, _all_reduce, _identity)


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sequence slices in, the whole sequence out, into split layers (their input gradients are partial)."""
    return Exchange.apply(x, group, _all_gather, _reduce_scatter)


def reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Partial sums over the whole sequence in, this rank's slice of their sum out."""
    return Exchange.apply(x, group, _reduce_scatter, _all_gather)


def scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Replicated in, this rank's sequence slice out."""
    return Exchange.apply(x, group, _slice, _all_gather)


def unscatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sequence slices in, the whole (replicated) sequence out, into replicated layers."""
    return Exchange.apply(x, group, _all_gather, _slice)


def pad_to(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``x`` with zeros after its own entries along ``dim`` up to ``size`` (a padded vocabulary shard)."""
    missing = size - x.shape[dim]
    return F.pad(x, [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, missing]) if missing else x


def _gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int, size: int) -> torch.Tensor:
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim).narrow(dim, 0, size)


def _own(x: torch.Tensor, group: dist.ProcessGroup, dim: int, rows: int) -> torch.Tensor:
    return pad_to(x, dim, rows * dist.get_world_size(group)).narrow(dim, rows * dist.get_rank(group), rows).contiguous()


def gather_vocabulary(x: torch.Tensor, group: dist.ProcessGroup, dim: int, size: int) -> torch.Tensor:
    """Vocabulary shards (equal, the last one padded) along ``dim`` in, the whole ``size`` entries out
    (its gradient: this rank's shard, zero on the padding)."""
    return Exchange.apply(x, group, functools.partial(_gather, dim=dim, size=size),
                          functools.partial(_own, dim=dim, rows=x.shape[dim]))
