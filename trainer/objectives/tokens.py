"""The shared shape of token-level objectives (CLM, MLM, span corruption): CE on labelled positions.

Labels follow the data loader's convention: ``labels[b, t]`` is the target of position ``t``
(already shifted for causal models), -100 where nothing is learnt. With ``chunk_size > 0`` the
model runs its LM head inside the chunked linear+CE (its ``head_loss``, inside forward, so ZeRO-3
and FSDP have the head's weight gathered), so full logits never exist; otherwise the model's
logits go through plain CE.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.distributed import unwrap
from trainer.objectives import Batch, LossOutput
from trainer.objectives.cross_entropy import IGNORE_INDEX, cross_entropy_sum, head_cross_entropy


class TokenObjective:
    """Base: subclasses say which batch keys feed the model (:meth:`model_inputs`)."""

    data_objective = "clm"

    def __init__(self, chunk_size: int = 0) -> None:
        self.chunk_size = chunk_size

    def model_inputs(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        raise NotImplementedError

    def count(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        args, kwargs = self.model_inputs(batch)
        labels = batch["labels"]
        if self.chunk_size:
            liger = unwrap(model).config.kernels == "liger"
            loss_sum = model(*args, **kwargs, head_loss=head_cross_entropy(labels, self.chunk_size, liger))
        else:
            loss_sum = cross_entropy_sum(model(*args, **kwargs), labels)
        return LossOutput(loss_sum=loss_sum, count=(labels != IGNORE_INDEX).sum())

