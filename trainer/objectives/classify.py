"""Sequence classification: cross-entropy of the classifier head's scores against one label per row.

Rows are the units; ``accuracy`` (argmax equals the label) is summed like the loss, so evaluation
logs ``eval/accuracy``. The model is built with ``head="classifier"`` and ``n_labels`` from the
training shards' manifest (see :func:`trainer.build.build_run_model`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import ConfigError
from trainer.objectives import Batch, LossOutput, ObjectiveContext


class Classification:
    data_objective = "classify"

    def count(self, batch: Batch) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        scores = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"]
        if scores.dim() != 2:
            raise ConfigError(f"classification needs a classifier model (scores [batch, labels]), "
                              f"got {list(scores.shape)}")
        correct = (scores.detach().argmax(dim=-1) == labels).float().sum()
        loss_sum = F.cross_entropy(scores.float(), labels, reduction="sum")
        return LossOutput(loss_sum=loss_sum, count=torch.tensor(labels.shape[0], device=scores.device),
                          metrics={"accuracy": correct})


def build(ctx: ObjectiveContext) -> Classification:
    return Classification()
