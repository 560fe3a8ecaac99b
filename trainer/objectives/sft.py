"""SFT: the causal-LM loss on assistant tokens only (the collator puts -100 everywhere else).

A micro-batch whose labels are all masked (no assistant token survived truncation, or the data
has no assistant turns) carries no signal: it is counted and reported with a warning. The loop
divides by the global count of trained tokens, so it adds nothing to the step instead of diluting
it as a silent loss of 0, and a global batch with no trained token at all is skipped by the guard.
"""

from __future__ import annotations

import logging

from trainer.objectives import Batch, ObjectiveContext
from trainer.objectives.clm import CausalLM

log = logging.getLogger("tessera.trainer")


class SupervisedFineTuning(CausalLM):
    def __init__(self, chunk_size: int) -> None:
        super().__init__("sft", chunk_size)
        self.all_masked_batches = 0

    def count(self, batch: Batch) -> int:
        n = super().count(batch)
        if n == 0:
            self.all_masked_batches += 1
            log.warning(
                "SFT micro-batch with every label masked (no assistant tokens): nothing to learn from it "
                "(%d such micro-batches so far); check the chat data and data.seq_len",
                self.all_masked_batches,
            )
        return n


def build(ctx: ObjectiveContext) -> SupervisedFineTuning:
    return SupervisedFineTuning(ctx.cfg.train.loss_chunk_size)
