"""Token cross-entropy summed over targets, with a chunked linear+CE that never holds full logits.

``chunked_linear_cross_entropy(hidden, weight, labels)`` computes ``sum(CE(hidden @ weight.T, labels))``
a chunk of rows at a time: logits of one chunk ([chunk, V]) exist at once, and the gradients for
``hidden`` and ``weight`` are computed in the same pass (as Liger-Kernel does), so the backward
needs no logits either. Pure PyTorch; equal to the plain path up to float rounding. Under vocab
parallel (trainer/strategy/vocab_parallel.py) the same pass runs on each rank's vocabulary shard.
:func:`head_cross_entropy` wraps it as the ``head_loss`` a model computes inside its forward.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.collate import IGNORE_INDEX
from model import kernels


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed CE over positions whose label is not -100 (logits [..., V], labels [...])."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                chunk_size: int, vocab_start: int, group: dist.ProcessGroup | None):
        """Every row of ``hidden`` has a target in ``labels`` (the caller dropped ignored ones). With
        ``group``, ``weight`` holds the vocabulary rows from ``vocab_start`` (vocab parallel, as
        Megatron's vocab-parallel cross-entropy): each row's max logit, then its sum of exponentials
        and its target's logit are all-reduced; the gradient of ``hidden`` is this shard's part."""
        need_grad = any(ctx.needs_input_grad[:3])
        grad_hidden = torch.zeros_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            target = labels[start : start + chunk_size] - vocab_start
            inside = (target >= 0) & (target < weight.shape[0])  # all of them without a group
            target = target.masked_fill(~inside, 0)[:, None]
            logits = (h @ weight.t()).float()
            if bias is not None:
                logits += bias.float()
            row_max = logits.max(dim=-1).values
            if group is not None:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            picked = logits.gather(1, target).squeeze(1).masked_fill(~inside, 0.0)
            exp = logits.sub_(row_max[:, None]).exp_()
            sums = torch.stack([exp.sum(dim=-1), picked])
            if group is not None:
                dist.all_reduce(sums, group=group)
            total += (sums[0].log() + row_max - sums[1]).sum()
            if need_grad:
                grad_logits = exp.div_(sums[0][:, None])
                grad_logits.scatter_add_(1, target, -inside.float()[:, None])
                grad_hidden[start : start + chunk_size] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
                grad_weight += grad_logits.t() @ h.float()
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype),
            (grad_weight * grad_output).to(ctx.weight_dtype),
            None if ctx.bias_dtype is None else (grad_bias * grad_output).to(ctx.bias_dtype),
            None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 4096,
    liger: bool = False,
    vocab_start: int = 0,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Summed CE of ``hidden [..., D] @ weight[V, D].T (+ bias)`` against ``labels [...]`` (-100 ignored).

    ``liger`` runs Liger-Kernel's fused linear + CE instead, on CUDA tensors (model.kernels=liger).
    With ``group``, ``weight`` and ``bias`` are this rank's vocabulary rows from ``vocab_start``
    (vocab parallel; Liger's kernel is not used then): the loss is whole on every rank."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1)
    if group is None and kernels.use_liger(liger, rows):
        return kernels.linear_cross_entropy(rows, weight, flat, bias)
    keep = flat != IGNORE_INDEX  # rows without a target cost nothing
    return _ChunkedLinearCE.apply(rows[keep], weight, bias, flat[keep], chunk_size, vocab_start, group)


@dataclasses.dataclass(frozen=True)
class HeadCrossEntropy:
    """The model's ``head_loss`` for ``labels [B, T]``: the summed chunked linear + CE, or with
    ``per_row`` one sum per row ([B], one fused call each: its gradients assume a scalar output).
    A dataclass so that a strategy can recognise it and compute it its own way (vocab parallel)."""

    labels: torch.Tensor
    chunk_size: int
    liger: bool = False
    per_row: bool = False

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 vocab_start: int = 0, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """``vocab_start`` and ``group``: as for :func:`chunked_linear_cross_entropy` (vocab parallel)."""
        def summed(h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return chunked_linear_cross_entropy(h, weight, labels, bias, self.chunk_size, self.liger, vocab_start,
                                                group)

        if self.per_row:
            return torch.stack([summed(h, t) for h, t in zip(hidden, self.labels)])
        return summed(hidden, self.labels)


def head_cross_entropy(labels: torch.Tensor, chunk_size: int, liger: bool = False,
                       per_row: bool = False) -> HeadCrossEntropy:
    """The model's ``head_loss`` for ``labels [B, T]`` (:class:`HeadCrossEntropy`)."""
    return HeadCrossEntropy(labels, chunk_size, liger, per_row)
