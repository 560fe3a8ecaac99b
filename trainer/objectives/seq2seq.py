"""Supervised seq2seq for encoder-decoders: source → encoder, target → decoder with teacher forcing.

The batch has span corruption's keys (:func:`data.collate.collate_seq2seq`), so the loss is the
same summed token CE over the target; only the data differs. Exact match by greedy decoding is
what ``tessera eval`` reports on seq2seq shards.
"""

from __future__ import annotations

from trainer.objectives import ObjectiveContext
from trainer.objectives.span import SpanCorruption


class TeacherForcedSeq2Seq(SpanCorruption):
    data_objective = "seq2seq"


def build(ctx: ObjectiveContext) -> TeacherForcedSeq2Seq:
    return TeacherForcedSeq2Seq(ctx.cfg.train.loss_chunk_size)
