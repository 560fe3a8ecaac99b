"""The deterministic, distributed, resumable sample stream over one or more shard manifests.

The idea is mosaicml streaming's, done on our tars:

* **Epoch order** — a pure function of (seed, epoch, manifests, weights): per dataset, its shards are
  permuted, their samples laid end to end and shuffled inside windows of ``shuffle_buffer``
  samples; with several datasets each contributes ``round(N * weight / sum(weights))`` samples per
  epoch (cycling when upsampled) and the contributions are interleaved by a seeded permutation.
* **Unit order** — the second level of the shuffle (Megatron's ``shuffle_idx``): when training, the
  epoch's units are permuted as a whole by a seeded permutation, so the ``B`` units of a micro-batch
  come from all over the epoch instead of being ``B`` neighbours of one or two documents (correlated
  gradients, measurably worse models). Positions below are positions in this permuted order.
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
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from data.shards import (
    REFERENCE_LOGPS,
    ShardError,
    ShardIndex,
    ShardInfo,
    ShardManifest,
    check_shard,
    load_index,
    open_shard,
    peek_shard,
)

UNIT_MODES = ("samples", "chunks", "rows")
MAX_OPEN_SHARDS = 128
log = logging.getLogger("tessera.data")


@dataclasses.dataclass
class Source:
    """One dataset of a mixture: a shard directory and its sampling weight."""

    path: str
    weight: float = 1.0


class ShardSet:
    """Every sample of every source; samples have flat integer ids, shard after shard.

    Start-up costs time and memory in proportion to the shards, not the samples: a shard's index
    file is loaded when the shard is first touched (at most ``MAX_OPEN_SHARDS`` held). With
    ``verify_checksums`` every shard is checked in full at start (sha256, index, token ids) on every
    rank, so shards that fail raise (``on_corrupt="fail"``) or are left out and listed in
    ``skipped`` (``"skip"``) by the same decision on every rank, and the order stays identical across
    ranks. Without it, start-up checks only that each shard is there, of its size and a tar; the
    rest is checked when a process first reads the shard, and a failure then raises, also with
    ``on_corrupt="skip"``: the epoch's order is fixed by then, and leaving the shard out on one rank
    would break the equal shares. Format-1 directories (no index files) and ``pipe:`` shards are
    indexed at start by walking their tars.
    """

    def __init__(
        self, sources: Sequence[Source], *, on_corrupt: str = "fail", verify_checksums: bool = True,
        allow_pipe: bool = False,
    ) -> None:
        if not sources:
            raise UserError("no training data: set data.train to a shard directory")
        self.sources = list(sources)
        self.manifests = [ShardManifest.load(s.path) for s in sources]
        first = self.manifests[0]
        for m in self.manifests[1:]:
            if (m.kind, m.tokenizer_sha256) != (first.kind, first.tokenizer_sha256):
                raise UserError(f"{m.root} holds {m.kind} shards from another tokenizer or kind than {first.root}; "
                                "a mixture needs one tokenizer and one kind")
        self.kind, self.fields = first.kind, first.fields
        self.dtypes = [first.field_dtype(f) for f in self.fields]
        self.allow_pipe, self.verify_checksums = allow_pipe, verify_checksums
        self.skipped: list[str] = []
        self._pinned: dict[int, bytes] = {}  # pipe: shards, held in memory
        self._open: OrderedDict[int, Any] = OrderedDict()  # memory maps, least recently used first
        self._views: dict[tuple[int, str], np.ndarray] = {}
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()  # loaded index files, likewise bounded
        self._resident: dict[int, ShardIndex] = {}  # format-1 and pipe: shards, indexed at start
        self._checked: set[int] = set()  # shards this process (or its parent) checked in full
        self._skipped: set[int] = set()
        self._shard_paths: list[tuple[int, int]] = []
        starts = [0]
        self.source_start: list[int] = []
        self.source_shards: list[list[tuple[int, int]]] = []  # (first flat id, samples) of each good shard
        for si, m in enumerate(self.manifests):
            self.source_start.append(starts[-1])
            good = []
            for shi, info in enumerate(m.shards):
                shard = len(self._shard_paths)
                self._shard_paths.append((si, shi))
                try:
                    self._check_at_start(shard, m, info)
                    good.append((starts[-1], info.samples))
                except ShardError as exc:
                    if on_corrupt != "skip":
                        raise
                    self.skipped.append(str(exc))
                    self._skipped.add(shard)
                starts.append(starts[-1] + info.samples)
            self.source_shards.append(good)
            walked = sum(info.samples for info in m.shards if info.index_sha256 is None
                         and not info.name.startswith("pipe:"))
            if walked:
                log.warning("%s: format-%d shards without index files; %d samples indexed at start by walking the "
                            "tars (re-shard with `tessera shard` for a start-up that does not grow with the samples)",
                            m.root, m.version, walked)
        self.shard_start = np.asarray(starts, np.int64)
        self.num_samples = int(self.shard_start[-1])
        if not any(self.source_shards):
            raise UserError("every shard was skipped as corrupt: " + "; ".join(self.skipped))
        self.reference_logps = self._reference_logps()

    def _check_at_start(self, shard: int, m: ShardManifest, info: ShardInfo) -> None:
        if info.name.startswith("pipe:") or info.index_sha256 is None:
            buf = open_shard(m, info, allow_pipe=self.allow_pipe)
            self._resident[shard] = check_shard(buf, m, info, verify_checksum=self.verify_checksums)
            if isinstance(buf, bytes):
                self._pinned[shard] = buf
            self._checked.add(shard)
        elif self.verify_checksums:
            check_shard(open_shard(m, info), m, info, verify_checksum=True, index=load_index(m, info))
            self._checked.add(shard)
        else:
            peek_shard(m, info)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers started with spawn reopen lazily
        return {**self.__dict__, "_open": OrderedDict(), "_views": {}, "_indexes": OrderedDict()}

    def fingerprint(self) -> str:
        """Hash of what defines the sample space: shard checksums and weights."""
        h = hashlib.sha256()
        for source, m in zip(self.sources, self.manifests):
            h.update(f"{source.weight!r}".encode())
            for info in m.shards:
                h.update(info.sha256.encode())
        return h.hexdigest()[:16]

    def gather(self, samples: np.ndarray, starts: np.ndarray, lengths: np.ndarray, field: int = 0) -> np.ndarray:
        """Concatenated pieces ``read(samples[k], field)[starts[k] : starts[k] + lengths[k]]``: one slice
        copy per piece out of the shard's whole memory map."""
        dtype = self.dtypes[field]
        shards, local = self._locate(np.asarray(samples, np.int64))
        ends = np.cumsum(lengths).tolist()
        out = np.empty(ends[-1] if ends else 0, dtype)
        at, itemsize, opened = 0, dtype.itemsize, {}
        for shard, sample, start, end in zip(shards.tolist(), local.tolist(), np.asarray(starts).tolist(), ends):
            if shard not in opened:
                opened[shard] = self._view(shard, dtype), self._index(shard).offsets
            view, offsets = opened[shard]
            begin = offsets.item(sample, field) // itemsize + start
            out[at:end] = view[begin : begin + end - at]
            at = end
        return out

    def _locate(self, samples: Any) -> tuple[Any, Any]:
        """(shard, sample inside it) of flat sample id(s)."""
        shards = np.searchsorted(self.shard_start, samples, "right") - 1
        return shards, samples - self.shard_start[shards]

    def _index(self, shard: int) -> ShardIndex:
        """A shard's index: indexed at start, or its index file loaded on first use (least recently
        used dropped beyond ``MAX_OPEN_SHARDS``)."""
        if shard in self._resident:
            return self._resident[shard]
        if shard in self._indexes:
            self._indexes.move_to_end(shard)
            return self._indexes[shard]
        if len(self._indexes) >= MAX_OPEN_SHARDS:
            self._indexes.popitem(last=False)
        si, shi = self._shard_paths[shard]
        index = self._indexes[shard] = load_index(self.manifests[si], self.manifests[si].shards[shi])
        return index

    def _view(self, shard: int, dtype: np.dtype) -> np.ndarray:
        """A whole shard as one array of ``dtype`` (members are aligned to their item size)."""
        key = (shard, dtype.str)
        if key not in self._views:
            self._views[key] = np.frombuffer(self._buffer(shard), dtype)
        return self._views[key]

    def _buffer(self, shard: int) -> Any:
        """The shard's bytes: pinned (pipe), or a memory map opened on first use, checked in full the
        first time this process reads a shard not checked at start. At most ``MAX_OPEN_SHARDS`` maps
        stay open (each holds a file descriptor); the least recently used is dropped, and closes once
        no array still refers to it."""
        if shard in self._pinned:
            return self._pinned[shard]
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        if len(self._open) >= MAX_OPEN_SHARDS:
            old, _ = self._open.popitem(last=False)
            for key in [k for k in self._views if k[0] == old]:
                del self._views[key]
        si, shi = self._shard_paths[shard]
        m = self.manifests[si]
        buf = open_shard(m, m.shards[shi])
        if shard not in self._checked:
            try:
                check_shard(buf, m, m.shards[shi], verify_checksum=True, index=self._index(shard))
            except ShardError as exc:
                raise ShardError(f"{exc}; found when first read (data.verify_checksums=false): "
                                 f"`tessera shard verify {m.root}` finds bad shards before a run") from None
            self._checked.add(shard)
        self._open[shard] = buf
        return buf

    def length(self, field: int = 0) -> np.ndarray:
        """Element counts of one field for every flat sample id (0 in skipped shards): reads every
        shard's index, once per epoch plan."""
        out = np.zeros(self.num_samples, np.int64)
        for shard in range(len(self._shard_paths)):
            if shard not in self._skipped:
                out[self.shard_start[shard] : self.shard_start[shard + 1]] = self._index(shard).counts[:, field]
        return out

    @property
    def counts(self) -> np.ndarray:
        """``[samples, fields]`` element counts (built on each call)."""
        return np.stack([self.length(f) for f in range(len(self.fields))], 1)

    def read(self, sample: int, field: int = 0) -> np.ndarray:
        """A sample's array for one field: a zero-copy view into the shard's memory map."""
        shard, local = (int(x) for x in self._locate(sample))
        index = self._index(shard)
        return np.frombuffer(self._buffer(shard), self.dtypes[field], int(index.counts[local, field]),
                             int(index.offsets[local, field]))

    def _reference_logps(self) -> np.ndarray | None:
        """Precomputed reference log-probs ``[sample, (chosen, rejected)]`` saved beside preference shards."""
        if self.kind != "preference":
            return None
        parts = []
        for m in self.manifests:
            path = Path(m.root) / REFERENCE_LOGPS
            if not path.is_file():
                return None
            values = np.load(path)
            if values.shape != (m.num_samples, 2):
                raise UserError(f"{path} has shape {values.shape}; expected ({m.num_samples}, 2)")
            parts.append(values.astype(np.float32))
        return np.concatenate(parts)


def epoch_order(shards: ShardSet, seed: int, epoch: int, *, shuffle: bool = True, buffer: int = 4096) -> np.ndarray:
    """Flat sample ids of one epoch, in order: a pure function of its arguments."""
    dtype = np.int32 if shards.num_samples < 2**31 else np.int64  # 4 bytes a sample below 2**31 samples
    per_source = []
    for si, good in enumerate(shards.source_shards):
        rng = np.random.default_rng([seed, epoch, si, 0x5EED])
        order = rng.permutation(len(good)) if shuffle else np.arange(len(good))
        ids = np.concatenate([np.arange(good[i][0], good[i][0] + good[i][1], dtype=dtype) for i in order]) if good \
            else np.zeros(0, dtype)
        if shuffle and len(ids) > 1:
            _shuffle_windows(ids, rng, max(1, buffer))
        per_source.append(ids)
    if len(per_source) == 1:
        return per_source[0]
    total = sum(len(ids) for ids in per_source)
    weights = np.array([s.weight for s in shards.sources], dtype=np.float64)
    takes = [round(total * w / weights.sum()) if len(ids) else 0 for w, ids in zip(weights, per_source)]
    labels = np.repeat(np.arange(len(per_source)), takes)
    if shuffle:
        labels = np.random.default_rng([seed, epoch, 0x313C]).permutation(labels)
    out = np.empty(len(labels), dtype)
    for si, (ids, take) in enumerate(zip(per_source, takes)):
        out[labels == si] = np.resize(ids, take)
    return out


def _shuffle_windows(ids: np.ndarray, rng: np.random.Generator, buffer: int, windows: int = 256) -> None:
    """Shuffle ``ids`` in place inside consecutive windows of ``buffer``: each window sorted by one
    uniform key a sample, drawn in order from ``rng`` (a stable sort per window), ``windows`` windows
    at a time, so the temporary arrays stay small whatever the number of samples."""
    step = buffer * windows
    for at in range(0, len(ids), step):
        part = ids[at : at + step]
        keys = rng.random(len(part))
        full = len(part) // buffer * buffer
        order = np.argsort(keys[:full].reshape(-1, buffer), axis=1, kind="stable")
        order += np.arange(0, full, buffer)[:, None]
        tail = full + np.argsort(keys[full:], kind="stable")
        part[:] = part[np.concatenate([order.reshape(-1), tail])]


class EpochPlan:
    """One epoch's units: how many there are and what the unit at each position reads.

    With ``unit_seed`` set, position ``p`` holds unit ``unit_order[p]`` of a seeded permutation of
    the epoch's units; without it, position ``p`` is unit ``p`` (evaluation keeps its order).
    """

    def __init__(
        self, shards: ShardSet, order: np.ndarray, mode: str, seq_len: int, field: int = 0,
        unit_seed: Sequence[int] | None = None,
    ) -> None:
        self.shards, self.order, self.mode, self.seq_len, self.field = shards, order, mode, seq_len, field
        if mode == "samples":
            self.num_units = len(order)
        elif mode == "chunks":
            self.chunk_start = self._cumulative(lambda lengths: np.maximum(1, -(-lengths // seq_len)))
            self.num_units = int(self.chunk_start[-1])
        elif mode == "rows":
            self.token_start = self._cumulative(lambda lengths: lengths)
            self.num_units = max(0, int(self.token_start[-1]) - 1) // seq_len
        else:
            raise ValueError(f"unknown unit mode {mode!r}")
        self.unit_order = None  # 4 bytes a unit below 2**31 units (a 1T-token epoch of 2k rows: 2 GB)
        if unit_seed is not None:
            dtype = np.int32 if self.num_units < 2**31 else np.int64
            self.unit_order = np.random.default_rng(unit_seed).permutation(np.arange(self.num_units, dtype=dtype))

    def _cumulative(self, units_of: Callable[[np.ndarray], np.ndarray], block: int = 1 << 20) -> np.ndarray:
        """``[0, u_0, u_0 + u_1, ...]`` of ``units_of(sample lengths)`` in epoch order, filled and summed
        in place a block at a time (one 8-byte-a-sample array at the peak besides the lengths)."""
        lengths = self.shards.length(self.field)
        out = np.zeros(len(self.order) + 1, np.int64)
        for at in range(0, len(self.order), block):
            out[at + 1 : at + 1 + block] = units_of(lengths[self.order[at : at + block]])
        np.cumsum(out, out=out)
        return out

    def unit(self, positions: Any) -> Any:
        """The unit (or array of units) at epoch position(s) ``positions``."""
        return positions if self.unit_order is None else self.unit_order[positions]

    def sample(self, position: int) -> int:
        """The flat sample id of the ``samples`` unit at ``position``."""
        return int(self.order[self.unit(position)])

    def chunk(self, position: int) -> np.ndarray:
        """The tokens of the ``chunks`` unit at ``position``: piece ``j`` of its sample."""
        unit = int(self.unit(position))
        i = int(np.searchsorted(self.chunk_start, unit, "right")) - 1
        j = unit - int(self.chunk_start[i])
        return self.shards.read(int(self.order[i]), self.field)[j * self.seq_len : (j + 1) * self.seq_len]

    def rows(self, positions: np.ndarray, fields: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray]:
        """The ``rows`` units at ``positions``, gathered with numpy: ``[len(positions), seq_len + 1]``
        per field, and a bool array marking where a document begins inside each row (index 0 is
        marked when a document starts exactly there)."""
        units = self.unit(np.asarray(positions, np.int64))
        n = self.seq_len + 1
        begins = np.asarray(units, np.int64) * self.seq_len
        first = np.searchsorted(self.token_start, begins, "right") - 1
        last = np.searchsorted(self.token_start, begins + n - 1, "right") - 1
        counts = last - first + 1
        row = np.repeat(np.arange(len(units)), counts)
        doc = np.repeat(first, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        seg_begin = np.maximum(self.token_start[doc], begins[row])
        seg_len = np.minimum(self.token_start[doc + 1], begins[row] + n) - seg_begin
        inside = seg_begin - self.token_start[doc]  # offset of the segment inside its document
        sample = self.order[doc]
        starts = np.zeros((len(units), n), bool)
        starts[row[inside == 0], (seg_begin - begins[row])[inside == 0]] = True
        out = [self.shards.gather(sample, inside, seg_len, f).reshape(len(units), n) for f in fields]
        return out, starts


@dataclasses.dataclass
class StreamState:
    """Where a stream stands: units ``[0, consumed)`` of ``epoch`` are done (on every rank)."""

    epoch: int = 0
    consumed: int = 0


class SampleStream:
    """The units one rank consumes, batch by batch, from a starting state; infinite for training,
    one pass for evaluation (``epochs=1``, whose last batch may be short)."""

    def __init__(
        self, shards: ShardSet, *, mode: str, seq_len: int, seed: int, rank: int, world_size: int,
        batch_size: int, shuffle: bool = True, shuffle_buffer: int = 4096, field: int = 0,
        epochs: int | None = None,
    ) -> None:
        if mode not in UNIT_MODES:
            raise ValueError(f"unknown unit mode {mode!r}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside a world of {world_size}")
        self.shards, self.mode, self.seq_len, self.seed = shards, mode, seq_len, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.shuffle, self.shuffle_buffer, self.field, self.epochs = shuffle, shuffle_buffer, field, epochs
        self._plans: dict[int, EpochPlan] = {}

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            order = epoch_order(self.shards, self.seed, epoch, shuffle=self.shuffle, buffer=self.shuffle_buffer)
            unit_seed = (self.seed, epoch, 0x0F17) if self.shuffle else None
            plan = EpochPlan(self.shards, order, self.mode, self.seq_len, self.field, unit_seed)
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

