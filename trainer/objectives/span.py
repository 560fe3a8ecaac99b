"""T5 span corruption for encoder-decoders: the decoder predicts the sentinel-delimited spans."""

from __future__ import annotations

from typing import Any

import torch

from trainer.objectives import Batch, ObjectiveContext
from trainer.objectives.tokens import TokenObjective


class SpanCorruption(TokenObjective):
    data_objective = "span"

    def model_inputs(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        kwargs = {"attention_mask": batch["attention_mask"], "decoder_attention_mask": batch["decoder_attention_mask"]}
        return (batch["input_ids"], batch["decoder_input_ids"]), kwargs


def build(ctx: ObjectiveContext) -> SpanCorruption:
    return SpanCorruption(ctx.cfg.train.loss_chunk_size)
