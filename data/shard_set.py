r"""The shards a run reads: one or more shard directories (a mixture of :class:`Source`\ s) opened as one
flat set of samples, read by sample id (:class:`ShardSet`); checked when opened or lazily on first read."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
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
