"""Masked LM for encoders: CE on the masked positions only (the collator masks 15%, 80/10/10)."""

from __future__ import annotations

from typing import Any

import torch

from trainer.objectives import Batch, ObjectiveContext
from trainer.objectives.tokens import TokenObjective


class MaskedLM(TokenObjective):
    data_objective = "mlm"

    def model_inputs(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        return (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}


def build(ctx: ObjectiveContext) -> MaskedLM:
    return MaskedLM(ctx.cfg.train.loss_chunk_size)
