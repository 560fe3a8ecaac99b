"""Vocab parallel (``parallel.vocab_parallel``, on by default under ``parallel.tp``): the token
embedding's and the LM head's vocabulary rows split over the tp ranks (tied or not), and the
training cross-entropy computed from vocab-sharded logits, so no rank holds full-vocabulary logits.

Our own code after Megatron-LM's ``VocabParallelEmbedding`` (megatron/core/tensor_parallel/layers.py)
and ``_VocabParallelCrossEntropy`` (megatron/core/tensor_parallel/cross_entropy.py): a rank looks up
the ids in its range, zeros the rest, and the group all-reduces the embeddings (under sequence parallel
the first block then takes its slice); the loss all-reduces each row's max logit, then its sum of
exponentials and its target's logit, one chunk of rows at a time (the chunked linear + CE of
:mod:`trainer.objectives.cross_entropy`, which a hook on the head points at this rank's shard).
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
from trainer.objectives.cross_entropy import HeadCrossEntropy
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


def _head_hook(start: int, group: dist.ProcessGroup):
    """A pre-hook on the LM head that swaps its ``head_loss`` for one over vocabulary shards."""

    def sharded(head_loss: HeadLoss | None) -> HeadLoss:
        def run(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if isinstance(head_loss, HeadCrossEntropy):  # its hidden's gradient: this shard's part, summed here
                return head_loss(copy_to_tp(hidden, group), weight, bias, start, group)
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
