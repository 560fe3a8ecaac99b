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

A vocabulary that tp does not divide (GPT-2's 50257 at tp=2) is padded as Megatron pads it
(:func:`vocab_shards`), inside the split only: the last rank's shard ends in zero rows that no id looks up,
that the loss leaves out of its softmax (their gradient is zero) and that gathered logits drop. The model,
its checkpoints and its exports keep the true vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from model.transformer import HeadLoss, OutputHead
from trainer.objectives.cross_entropy import HeadCrossEntropy
from trainer.strategy.partitioned import Partitioned, even_ranges
from trainer.strategy.tp_collectives import copy_to_tp, gather_vocabulary, reduce_from_tp

PAD_MULTIPLE = 128  # Megatron's make_vocab_size_divisible_by: padded shards of GPU-friendly widths


def vocab_shards(vocab: int, tp: int) -> tuple[list[torch.Tensor], int]:
    """Each rank's vocabulary rows and the rows each rank's shard holds. Equal shards where ``tp``
    divides ``vocab``; otherwise, as Megatron pads the vocabulary, ceil(vocab / tp) rows rounded up to a
    multiple of 128 (not rounded where that would leave the last rank no row of its own), the last
    shard ending in padding rows that no token looks up and no logit comes from."""
    if vocab % tp == 0:
        return even_ranges(vocab, tp), vocab // tp
    even = -(-vocab // tp)
    for rows in (-(-even // PAD_MULTIPLE) * PAD_MULTIPLE, even):
        if rows * (tp - 1) < vocab:
            return [torch.arange(r * rows, min(r * rows + rows, vocab)) for r in range(tp)], rows
    raise ConfigError(f"parallel.vocab_parallel cannot give each of parallel.tp={tp} ranks a row of "
                      f"model.vocab_size={vocab}: set parallel.vocab_parallel=false")


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of a token embedding; ids outside them look up zeros, summed over the group."""

    def __init__(self, embedding: nn.Embedding, strategy: Partitioned) -> None:
        super().__init__()
        rows, size = vocab_shards(embedding.num_embeddings, strategy.size)
        self.group = strategy.shard_group
        self.weight = strategy.split(embedding.weight, 0, rows, size)
        own = rows[strategy.shard_rank]
        self.start, self.rows = int(own[0]), len(own)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(out, self.group)


def _head_hook(own: torch.Tensor, vocab: int, group: dist.ProcessGroup):
    """A pre-hook on the LM head that swaps its ``head_loss`` for one over vocabulary shards (this rank's
    rows ``own`` of ``vocab``; a padded shard's extra rows take no part)."""
    start, rows = int(own[0]), len(own)

    def sharded(head_loss: HeadLoss | None) -> HeadLoss:
        def run(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if isinstance(head_loss, HeadCrossEntropy):  # its hidden's gradient: this shard's part, summed here
                mine = None if bias is None else bias[:rows]
                return head_loss(copy_to_tp(hidden, group), weight[:rows], mine, start, group)
            if head_loss is not None:  # an unknown head: the whole weight
                whole_bias = None if bias is None else gather_vocabulary(bias, group, 0, vocab)
                return head_loss(hidden, gather_vocabulary(weight, group, 0, vocab), whole_bias)
            return gather_vocabulary(F.linear(copy_to_tp(hidden, group), weight, bias), group, -1, vocab).float()

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
    embed = getattr(model, "embed", None)
    if embed is not None:
        embed.tokens = VocabParallelEmbedding(embed.tokens, strategy)
    vocab = model.config.vocab_size
    rows, size = vocab_shards(vocab, strategy.size)
    for head in [m for m in model.modules() if isinstance(m, OutputHead)]:
        if head.weight is not None:
            head.weight = strategy.split(head.weight, 0, rows, size)
        if head.bias is not None:
            head.bias = strategy.split(head.bias, 0, rows, size)
        head.register_forward_pre_hook(_head_hook(rows[strategy.shard_rank], vocab, strategy.shard_group),
                                       with_kwargs=True)
