"""Vocab parallel (``parallel.vocab_parallel``, on by default under ``parallel.tp``): the token
embedding's and the LM head's vocabulary rows split over the tp ranks (tied or not), and the
training cross-entropy computed from vocab-sharded logits, so no rank holds full-vocabulary logits.

Our own code after Megatron-LM's ``VocabParallelEmbedding`` (megatron/core/tensor_parallel/layers.py)
and ``_VocabParallelCrossEntropy`` (megatron/core/tensor_parallel/cross_entropy.py): a rank looks up
the ids in its range, zeros the rest, and the group all-reduces the embeddings (under sequence parallel
the first block then takes its slice); the loss all-reduces each row's max logit, then its sum of
exponentials and its target's logit, one chunk of rows at a time (the chunked linear + CE of
:mod:`trainer.objectives.cross_entropy`, whose ``head_loss`` a hook on the head replaces).
Plain logits (``train.loss_chunk_size=0``, evaluation, generation) and other ``head_loss`` callables
(PPO's policy + value heads) get the vocabulary gathered: full logits, as without vocab parallel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.transformer import HeadLoss, OutputHead
from trainer.objectives.cross_entropy import IGNORE_INDEX, HeadCrossEntropy
from trainer.strategy.partitioned import Partitioned, even_ranges
from trainer.strategy.tp_collectives import copy_to_tp, gather_vocabulary, reduce_from_tp


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of a token embedding; ids outside them look up zeros, summed over the group."""

    def __init__(self, embedding: nn.Embedding, rows: list[torch.Tensor], strategy: Partitioned) -> None:
        super().__init__()
        self.group = strategy.shard_group
        self.weight = strategy.split(embedding.weight, 0, rows)
        self.start = int(rows[strategy.shard_rank][0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(out, self.group)


class _VocabParallelLinearCE(torch.autograd.Function):
    """Summed CE of ``hidden @ weight.T (+ bias)`` where ``weight`` holds this rank's vocabulary rows
    (from ``start``), a chunk of rows at a time; every row has a target. The loss is whole on every
    rank; the gradient of ``hidden`` is this shard's part (the caller's ``copy_to_tp`` sums it)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                start: int, group: dist.ProcessGroup, chunk_size: int):
        need_grad = any(ctx.needs_input_grad[:3])
        grad_hidden = torch.zeros_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for begin in range(0, hidden.shape[0], chunk_size):
            h = hidden[begin : begin + chunk_size]
            target = labels[begin : begin + chunk_size] - start
            inside = (target >= 0) & (target < weight.shape[0])
            target = target.masked_fill(~inside, 0)[:, None]
            logits = (h @ weight.t()).float()
            if bias is not None:
                logits += bias.float()
            row_max = logits.max(dim=-1).values
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            exp = (logits - row_max[:, None]).exp_()
            picked = logits.gather(1, target).squeeze(1).masked_fill(~inside, 0.0)
            sums = torch.stack([exp.sum(dim=-1), picked])  # one all-reduce for both
            dist.all_reduce(sums, group=group)
            total += (sums[0].log() + row_max - sums[1]).sum()
            if need_grad:
                grad_logits = exp.div_(sums[0][:, None])
                grad_logits.scatter_add_(1, target, -inside.float()[:, None])
                grad_hidden[begin : begin + chunk_size] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
                grad_weight += grad_logits.t() @ h.float()
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_hidden * grad_output.to(grad_hidden.dtype), (grad_weight * grad_output).to(ctx.weight_dtype),
                None if ctx.bias_dtype is None else (grad_bias * grad_output).to(ctx.bias_dtype),
                None, None, None, None)


def vocab_parallel_cross_entropy(loss: HeadCrossEntropy, hidden: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor | None, start: int, group: dist.ProcessGroup) -> torch.Tensor:
    """What ``loss`` computes, from this rank's vocabulary rows of the head (Liger's kernel aside)."""
    hidden = copy_to_tp(hidden, group)

    def summed(h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, flat = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        keep = flat != IGNORE_INDEX
        return _VocabParallelLinearCE.apply(rows[keep], weight, bias, flat[keep], start, group, loss.chunk_size)

    if loss.per_row:
        return torch.stack([summed(h, t) for h, t in zip(hidden, loss.labels)])
    return summed(hidden, loss.labels)


def _head_hook(start: int, group: dist.ProcessGroup):
    """A pre-hook on the LM head that swaps its ``head_loss`` for one over vocabulary shards."""

    def sharded(head_loss: HeadLoss | None) -> HeadLoss:
        def run(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if isinstance(head_loss, HeadCrossEntropy):
                return vocab_parallel_cross_entropy(head_loss, hidden, weight, bias, start, group)
            if head_loss is not None:  # an unknown head: the whole weight
                whole_bias = None if bias is None else gather_vocabulary(bias, group, 0)
                return head_loss(hidden, gather_vocabulary(weight, group, 0), whole_bias)
            return gather_vocabulary(F.linear(copy_to_tp(hidden, group), weight, bias), group, -1).float()

        return run

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        hidden, weight, *rest = args
        options = dict(zip(("return_hidden", "head_loss"), rest)) | kwargs
        if options.get("return_hidden"):
            return None
        return (hidden, weight), {"head_loss": sharded(options.get("head_loss"))}

    return hook


def split_vocabulary(model: nn.Module, strategy: Partitioned) -> None:
    """Split the token embeddings and the LM head (weight, bias) by vocabulary rows over the shard group."""
    group, tp = strategy.shard_group, strategy.size
    embed = getattr(model, "embed", None)
    if embed is not None:
        tokens = embed.tokens
        embed.tokens = VocabParallelEmbedding(tokens, even_ranges(tokens.num_embeddings, tp), strategy)
    for head in [m for m in model.modules() if isinstance(m, OutputHead)]:
        rows = even_ranges(model.config.vocab_size, tp)
        if head.weight is not None:
            head.weight = strategy.split(head.weight, 0, rows)
        if head.bias is not None:
            head.bias = strategy.split(head.bias, 0, rows)
        head.register_forward_pre_hook(_head_hook(int(rows[strategy.shard_rank][0]), group), with_kwargs=True)
