"""The deterministic, distributed, resumable sample stream over one or more shard manifests.

The idea is mosaicml streaming's, done on our tars:

* **Epoch order** — a pure function of (seed, epoch, manifests, weights): per dataset, its shards are
  permuted, their samples laid end to end and shuffled inside windows of ``shuffle_buffer``
  samples; with several datasets each contributes ``round(N * weight / sum(weights))`` samples per
  epoch (cycling when upsampled) and the contributions are interleaved by a seeded permutation, a
  block of ``SPAN_SAMPLES`` positions at a time beyond one block (:class:`EpochOrder`).
* **Unit order** — the second level of the shuffle (Megatron's ``shuffle_idx``): when training, the
  epoch's units are permuted by a seeded permutation, so the ``B`` units of a micro-batch come from
  all over the epoch instead of being ``B`` neighbours of one or two documents (correlated
  gradients, measurably worse models). Up to ``SPAN_SAMPLES`` samples an epoch it is one
  permutation of all units; beyond, blocks of units are permuted and read interleaved
  (:class:`UnitOrder`). Positions below are positions in this permuted order.
* **At scale** — nothing is held per sample or per unit for one source: the order, and which
  tokens each unit reads, are computed a span of positions at a time when first needed
  (:class:`EpochPlan`), so a rank's plan takes O(shards) time and memory to make, a mixture's too.
* **Units** — what a rank consumes: whole samples (``"samples"``), pieces of at most ``seq_len``
  tokens of each sample (``"chunks"``), or rows of the epoch's concatenated token stream
  (``"rows"``: row ``g`` is tokens ``[g*L, g*L + L + 1)``, overlapping the next row by one token so
  its labels are complete).
* **Split** — of the units not yet consumed in the epoch, ``[P, U)``, rank ``r`` of ``W`` takes
  ``P + r, P + r + W, ...`` — ``(U - P) // W`` of them, the same count on every rank (the last
  ``(U - P) % W`` units of an epoch are dropped). A rank's batch ``j`` (``B`` units) is made by
  DataLoader worker ``j % K``, the order in which the DataLoader hands batches back.
* **State** — ``(epoch, consumed)``: all ranks advance in lockstep, so after any number of steps the
  consumed units form the prefix ``[0, consumed)`` of the epoch's order, whatever the world size.
  Resuming on another world size splits the rest ``[consumed, U)`` anew: every remaining unit
  exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from common.errors import UserError
from data.epoch_plan import SPAN_SAMPLES, UNIT_MODES, EpochOrder, EpochPlan
from data.shard_set import ShardSet


@dataclasses.dataclass
class StreamState:
    """Where a stream stands: units ``[0, consumed)`` of ``epoch`` are done (on every rank)."""

    epoch: int = 0
    consumed: int = 0


class SampleStream:
    """The units one rank consumes, batch by batch, from a starting state; infinite for training,
    one pass for evaluation (``epochs=1``, whose last batch may be short). ``span``: the epoch
    positions a plan computes at a time (default ``SPAN_SAMPLES``; small in tests)."""

    def __init__(
        self, shards: ShardSet, *, mode: str, seq_len: int, seed: int, rank: int, world_size: int,
        batch_size: int, shuffle: bool = True, shuffle_buffer: int = 4096, field: int = 0,
        epochs: int | None = None, span: int | None = None,
    ) -> None:
        if mode not in UNIT_MODES:
            raise ValueError(f"unknown unit mode {mode!r}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside a world of {world_size}")
        self.shards, self.mode, self.seq_len, self.seed = shards, mode, seq_len, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.shuffle, self.shuffle_buffer, self.field, self.epochs = shuffle, shuffle_buffer, field, epochs
        self.span = span or SPAN_SAMPLES
        self._plans: dict[int, EpochPlan] = {}

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            order = EpochOrder(self.shards, self.seed, epoch, shuffle=self.shuffle, buffer=self.shuffle_buffer,
                               block=self.span)
            unit_seed = (self.seed, epoch, 0x0F17) if self.shuffle else None
            plan = EpochPlan(self.shards, order, self.mode, self.seq_len, self.field, unit_seed, self.span)
            if plan.num_units < self.world_size:
                raise UserError(
                    f"the data gives {plan.num_units} {self.mode} per epoch at seq_len {self.seq_len}, fewer than "
                    f"the {self.world_size} ranks; add data or use fewer ranks"
                )
            self._plans[epoch] = plan
        return self._plans[epoch]

    def rank_units(self, state: StreamState) -> Iterator[tuple[int, np.ndarray]]:
        """(epoch, unit positions) for this rank, epoch after epoch, starting at ``state``."""
        epoch, consumed = state.epoch, state.consumed
        while self.epochs is None or epoch < self.epochs:
            total = self.plan(epoch).num_units
            count = max(0, total - consumed) // self.world_size
            start = consumed + self.rank
            yield epoch, np.arange(start, start + count * self.world_size, self.world_size)
            epoch, consumed = epoch + 1, 0

    def batches(
        self, state: StreamState, worker: int = 0, num_workers: int = 1
    ) -> Iterator[list[tuple[int, np.ndarray]]]:
        """This worker's batches: batch ``j`` for ``j % num_workers == worker``, each a list of
        (epoch, unit positions) pieces holding ``batch_size`` units in all (fewer only at the end of
        a finite stream)."""
        pending: list[tuple[int, np.ndarray]] = []
        filled = j = 0
        for epoch, units in self.rank_units(state):
            at = 0
            while at < len(units):
                take = min(self.batch_size - filled, len(units) - at)
                if j % num_workers == worker:
                    pending.append((epoch, units[at : at + take]))
                filled, at = filled + take, at + take
                if filled == self.batch_size:
                    if j % num_workers == worker:
                        yield pending
                    pending, filled, j = [], 0, j + 1
        if filled and j % num_workers == worker:
            yield pending

    def advance(self, state: StreamState, batches: int) -> StreamState:
        """The state after this rank (and so every rank) consumed ``batches`` full batches."""
        per_rank = batches * self.batch_size
        epoch, consumed = state.epoch, state.consumed
        while True:
            left = (self.plan(epoch).num_units - consumed) // self.world_size
            if per_rank < left:
                return StreamState(epoch, consumed + per_rank * self.world_size)
            per_rank -= left
            epoch, consumed = epoch + 1, 0
