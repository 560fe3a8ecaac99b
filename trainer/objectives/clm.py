"""Causal LM (also SFT): next-token CE on packed rows, attention kept within each document."""

from __future__ import annotations

from typing import Any

import torch

from trainer.objectives import Batch, ObjectiveContext
from trainer.objectives.tokens import TokenObjective, chunk_size_for


class CausalLM(TokenObjective):
    def __init__(self, data_objective: str, chunk_size: int) -> None:
        super().__init__(chunk_size)
        self.data_objective = data_objective

    def model_inputs(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        keys = ("attention_mask", "document_ids", "position_ids")
        return (batch["input_ids"],), {k: batch[k] for k in keys if k in batch}


def build(ctx: ObjectiveContext) -> CausalLM:
    return CausalLM("sft" if ctx.name == "sft" else "clm", chunk_size_for(ctx))
