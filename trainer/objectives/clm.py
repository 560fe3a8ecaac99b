"""Causal LM: next-token CE on packed rows, attention kept within each document."""

from __future__ import annotations

from typing import Any

import torch

from trainer.objectives import Batch, ObjectiveContext
from trainer.objectives.tokens import TokenObjective


class CausalLM(TokenObjective):
    def __init__(self, data_objective: str, chunk_size: int) -> None:
        """``data_objective`` is clm for pretraining rows, sft for chat rows (the SFT objective)."""
        super().__init__(chunk_size)
        self.data_objective = data_objective

    def model_inputs(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        keys = ("attention_mask", "document_ids", "position_ids")
        return (batch["input_ids"],), {k: batch[k] for k in keys if k in batch}


def build(ctx: ObjectiveContext) -> CausalLM:
    return CausalLM("clm", ctx.cfg.train.loss_chunk_size)
