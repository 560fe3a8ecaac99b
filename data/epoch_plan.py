"""One epoch's order and units, computed a span of positions at a time: the sample order
(:class:`EpochOrder`), the unit order (:class:`UnitOrder`) and what each unit reads (:class:`EpochPlan`).
data/stream.py's docstring describes the whole stream."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from data.shard_set import ShardSet
from data.shards import (
    NON_TOKEN_FIELDS,
    ShardError,
)

UNIT_MODES = ("samples", "chunks", "rows")


SPAN_SAMPLES = 1 << 18  # epoch positions computed together (whole shuffle windows); also a unit block's reach
BLOCKS_IN_FLIGHT = 8  # unit blocks read interleaved at a time in an epoch of several blocks
# The order's version, kept in the loader's state. 1 (states without one): one permutation of an epoch's
# units and of a mixture's source labels; 2: both in blocks beyond SPAN_SAMPLES (an epoch up to one block
# is ordered as in 1).
ORDER_VERSION = 2


def _window_order(keys: np.ndarray, buffer: int) -> np.ndarray:
    """The permutation that sorts each consecutive window of ``buffer`` keys (a stable sort; the last
    window may be short)."""
    full = len(keys) // buffer * buffer
    order = np.argsort(keys[:full].reshape(-1, buffer), axis=1, kind="stable")
    order += np.arange(0, full, buffer)[:, None]
    return np.concatenate([order.reshape(-1), full + np.argsort(keys[full:], kind="stable")])


class _Layout:
    """One source's shards in an epoch's order, laid end to end (its positions before the window
    shuffle), and the generator state the window keys are drawn from: O(shards) to hold."""

    def __init__(self, shards: ShardSet, good: list[tuple[int, int]], rng: np.random.Generator, shuffle: bool) -> None:
        order = rng.permutation(len(good)) if shuffle else np.arange(len(good))
        kept = [good[i] for i in order if good[i][1]]
        self.first = np.array([first for first, _ in kept], np.int64)  # flat id of each shard's first sample
        self.start = np.zeros(len(kept) + 1, np.int64)
        np.cumsum(np.array([n for _, n in kept], np.int64), out=self.start[1:])
        self.shard = np.searchsorted(shards.shard_start, self.first, "right") - 1  # flat shard index
        self.num_samples = int(self.start[-1])
        self.keys = rng.bit_generator.state if shuffle and self.num_samples > 1 else None

    def ids(self, shards: ShardSet, lo: int, hi: int, buffer: int, field: int | None) -> tuple[np.ndarray, Any]:
        """Flat ids at positions ``[lo, hi)`` (``lo`` a multiple of ``buffer``) after the window
        shuffle; with ``field``, their element counts too. The keys of a window are the generator's
        draws number ``lo...`` (PCG64 jumps there), so the order is the one all windows drawn in turn give."""
        dtype = np.int32 if shards.num_samples < 2**31 else np.int64  # 4 bytes a sample below 2**31 samples
        ids, counts = [np.zeros(0, dtype)], [np.zeros(0, np.int64)]
        k = int(np.searchsorted(self.start, lo, "right")) - 1
        while lo < hi and self.start[k] < hi:
            at = int(self.start[k])
            a, b = max(lo, at) - at, min(hi, int(self.start[k + 1])) - at
            ids.append(np.arange(self.first[k] + a, self.first[k] + b, dtype=dtype))
            if field is not None:
                counts.append(shards._index(int(self.shard[k])).counts[a:b, field])
            k += 1
        out, lengths = np.concatenate(ids), np.concatenate(counts) if field is not None else None
        if self.keys is not None:
            bits = np.random.PCG64()
            bits.state = self.keys
            bits.advance(lo)
            order = _window_order(np.random.Generator(bits).random(hi - lo), buffer)
            out, lengths = out[order], None if lengths is None else lengths[order]
        return out, lengths


def mixture_prefix(takes: Sequence[int], position: int) -> list[int]:
    """Each source's draws among a mixture epoch's first ``position`` samples (``takes`` per source in
    all): source ``s`` takes its part of what the sources from ``s`` on share, rounded down, and the
    rest goes on. Each count grows with ``position`` (never back), they add up to ``position``, at
    the epoch's end they are ``takes``, and each is within ``len(takes)`` of its exact share."""
    left, rest, out = position, sum(takes), []
    for take in takes[:-1]:
        later = rest - take
        after = left * later // rest if rest else 0
        out.append(left - after)
        left, rest = after, later
    return [*out, left]


class EpochOrder:
    """The flat sample ids of one epoch in order, a pure function of (seed, epoch, shard set): per
    source its shards permuted, their samples laid end to end and shuffled inside windows of
    ``buffer``. One source's ids are computed a range of windows at a time, on demand.

    Several sources are mixed by weight: source ``s`` gives ``round(N * w_s / sum(w))`` draws an
    epoch, its ``k``-th draw the id at position ``k % len(s)`` of its own order (cycling when
    upsampled). The epoch's positions are cut into blocks of ``block`` (the windows of a mixture);
    each block holds the draws :func:`mixture_prefix` gives up to its end less those up to its start,
    its source labels permuted by the block's seeded generator. An epoch of one block is one
    permutation of all labels, as before blocks.
    """

    def __init__(
        self, shards: ShardSet, seed: int, epoch: int, *, shuffle: bool = True, buffer: int = 4096,
        block: int = SPAN_SAMPLES,
    ) -> None:
        self.shards, self.buffer, self.seed, self.epoch, self.shuffle = shards, max(1, buffer), seed, epoch, shuffle
        self.layouts = [_Layout(shards, good, np.random.default_rng([seed, epoch, si, 0x5EED]), shuffle)
                        for si, good in enumerate(shards.source_shards)]
        self.layout: _Layout | None = self.layouts[0] if len(self.layouts) == 1 else None
        if self.layout is not None:
            self.num_samples, self.window = self.layout.num_samples, self.buffer
        else:
            sizes = [layout.num_samples for layout in self.layouts]
            total, weights = sum(sizes), np.array([s.weight for s in shards.sources], dtype=np.float64)
            self.takes = [round(total * w / weights.sum()) if n else 0 for w, n in zip(weights, sizes)]
            self.num_samples = sum(self.takes)
            self.window = max(1, min(block, self.num_samples))
        self.num_windows = -(-self.num_samples // self.window)

    def draws(self, position: int) -> list[tuple[int, int]]:
        """(source, draws of it) before epoch position ``position`` (a multiple of the window, or the
        epoch's end)."""
        if self.layout is not None:
            return [(0, position)]
        return list(enumerate(mixture_prefix(self.takes, position)))

    def source_ids(self, source: int, lo: int, hi: int, field: int | None) -> tuple[np.ndarray, Any]:
        """Draws ``[lo, hi)`` of one source (``k``: its position ``k % len``) and, with ``field``,
        their element counts."""
        layout, n = self.layouts[source], self.layouts[source].num_samples
        if hi - lo >= n:  # the block covers the source whole: compute it once
            ids, lengths = layout.ids(self.shards, 0, n, self.buffer, field)
            at = np.arange(lo, hi) % n
            return ids[at], None if lengths is None else lengths[at]
        pieces = []
        while lo < hi:  # at most two pieces: up to the source's end, then from its start
            a = lo % n
            b = min(n, a + hi - lo)
            first = a // self.buffer * self.buffer
            last = min(n, -(-b // self.buffer) * self.buffer)
            ids, lengths = layout.ids(self.shards, first, last, self.buffer, field)
            pieces.append((ids[a - first : b - first], None if lengths is None else lengths[a - first : b - first]))
            lo += b - a
        ids = np.concatenate([i for i, _ in pieces])
        return ids, None if field is None else np.concatenate([c for _, c in pieces])

    def _block(self, b: int, field: int | None) -> tuple[np.ndarray, Any]:
        """A mixture's window ``b``: its sources' draws at the positions its permuted labels give."""
        lo, hi = b * self.window, min(self.num_samples, (b + 1) * self.window)
        before, upto = mixture_prefix(self.takes, lo), mixture_prefix(self.takes, hi)
        labels = np.repeat(np.arange(len(self.takes)), np.subtract(upto, before))
        if self.shuffle:
            seed = [self.seed, self.epoch, 0x313C] + ([b] if self.num_windows > 1 else [])
            labels = np.random.default_rng(seed).permutation(labels)
        dtype = np.int32 if self.shards.num_samples < 2**31 else np.int64
        ids, lengths = np.empty(len(labels), dtype), None if field is None else np.empty(len(labels), np.int64)
        for si, (a, z) in enumerate(zip(before, upto)):
            if z > a:
                at = labels == si
                ids[at], counts = self.source_ids(si, a, z, field)
                if lengths is not None:
                    lengths[at] = counts
        return ids, lengths

    def ids(self, first: int, last: int, field: int | None = None) -> tuple[np.ndarray, Any]:
        """Flat ids of windows ``[first, last)``; with ``field``, their element counts too."""
        if self.layout is not None:
            lo, hi = first * self.window, min(self.num_samples, last * self.window)
            return self.layout.ids(self.shards, lo, hi, self.window, field)
        blocks = [self._block(b, field) for b in range(first, min(last, self.num_windows))]
        if not blocks:
            return self.layouts[0].ids(self.shards, 0, 0, self.buffer, field)
        ids = np.concatenate([i for i, _ in blocks])
        return ids, None if field is None else np.concatenate([c for _, c in blocks])


def epoch_order(shards: ShardSet, seed: int, epoch: int, *, shuffle: bool = True, buffer: int = 4096) -> np.ndarray:
    """All flat sample ids of one epoch, in order (materialised: 4 bytes a sample)."""
    order = EpochOrder(shards, seed, epoch, shuffle=shuffle, buffer=buffer)
    return order.ids(0, order.num_windows)[0]


def _rotation(groups: np.ndarray, rounds: np.ndarray) -> np.ndarray:
    """A pseudo-random offset for each (group, round): hashed, so ranks striding over positions do
    not keep meeting the same block."""
    g = groups.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    r = rounds.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
    return ((g ^ r) >> np.uint64(33)).astype(np.int64)


class UnitOrder:
    """Position → unit: the seeded permutation of an epoch's units (the second level of the shuffle),
    computed a block at a time.

    An epoch of one block (at most ``block`` units) is ``default_rng(seed).permutation(num_units)``.
    A longer one is cut into blocks of ``block`` units (the last one shorter), the blocks are
    permuted, and groups of up to ``BLOCKS_IN_FLIGHT`` of them (as equal as can be) are read in turn,
    the blocks of a group interleaved, each in its own seeded permutation: the positions of a group
    go round its blocks, one unit of each a round, in an order rotated round by round (a short block
    drops out of the rounds once read). So a micro-batch draws from blocks far apart in the epoch,
    and only a group's permutations are needed at a time. Without a seed, position ``p`` is unit
    ``p`` (evaluation keeps its order).
    """

    def __init__(self, num_units: int, seed: Sequence[int] | None, block: int) -> None:
        self.num_units, self.seed, self.block = num_units, None if seed is None else list(seed), max(1, block)
        self.num_blocks = max(1, -(-num_units // self.block))
        self._groups: OrderedDict[int, np.ndarray] = OrderedDict()
        if self.seed is None or self.num_blocks == 1:
            return
        self.tail = num_units - (self.num_blocks - 1) * self.block
        self.blocks = np.random.default_rng([*self.seed, 0xB10C]).permutation(self.num_blocks)
        groups = -(-self.num_blocks // BLOCKS_IN_FLIGHT)  # of as equal sizes as can be: no group of one at the end
        self.members = self.num_blocks // groups + (np.arange(groups) < self.num_blocks % groups)
        self.first_member = np.concatenate([[0], np.cumsum(self.members)[:-1]])
        at = int(np.flatnonzero(self.blocks == self.num_blocks - 1)[0])  # where the last (short) block went
        group = int(np.searchsorted(self.first_member, at, "right")) - 1
        sizes = self.members * self.block
        sizes[group] -= self.block - self.tail
        self.short = np.full(groups, -1)  # the short block's slot in its group, if shorter than a block
        if self.tail < self.block:
            self.short[group] = at - self.first_member[group]
        self.group_start = np.zeros(groups + 1, np.int64)
        np.cumsum(sizes, out=self.group_start[1:])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_groups": OrderedDict()}

    def __call__(self, positions: Any) -> Any:
        """The unit (or array of units) at epoch position(s) ``positions``."""
        if self.seed is None:
            return positions
        if self.num_blocks == 1:
            return self._group(0)[positions]
        p = np.asarray(positions, np.int64)
        shape, p = p.shape, p.reshape(-1)
        g = np.searchsorted(self.group_start, p, "right") - 1
        o = p - self.group_start[g]
        m, short = self.members[g], self.short[g]
        t = np.where(short >= 0, self.tail, self.block)  # units of each block read in rounds of all m
        first = o < m * t
        after, rest = o - m * t, np.maximum(m - 1, 1)  # then rounds of the m - 1 full blocks
        index = np.where(first, o // m, t + after // rest)
        size = np.where(first, m, rest)
        j = (np.where(first, o, after) % size + _rotation(g, index)) % size
        slot = j + (~first & (j >= short))
        out = np.empty(len(p), np.int64)
        for group in np.unique(g).tolist():  # one, or two where a group ends
            sel = g == group
            slots, table = slot[sel], self._group(group)
            out[sel] = self.blocks[self.first_member[group] + slots] * self.block + table[slots, index[sel]]
        return out.reshape(shape)

    def _group(self, g: int) -> np.ndarray:
        """Group ``g``'s block permutations, ``[blocks, block]`` (the last two groups kept); with one
        block, its permutation."""
        if g in self._groups:
            self._groups.move_to_end(g)
            return self._groups[g]
        if len(self._groups) >= 2:
            self._groups.popitem(last=False)
        dtype = np.int32 if min(self.block, self.num_units) < 2**31 else np.int64
        if self.num_blocks == 1:
            table = np.random.default_rng(self.seed).permutation(np.arange(self.num_units, dtype=dtype))
        else:
            blocks = self.blocks[self.first_member[g] : self.first_member[g] + self.members[g]].tolist()
            table = np.zeros((len(blocks), self.block), dtype)
            for slot, b in enumerate(blocks):
                size = min(self.block, self.num_units - b * self.block)
                table[slot, :size] = np.random.default_rng([*self.seed, b]).permutation(np.arange(size, dtype=dtype))
        self._groups[g] = table
        return table


class EpochPlan:
    """One epoch's units: how many there are and what the unit at each position reads.

    Position ``p`` holds unit ``unit(p)`` (:class:`UnitOrder`). Nothing is held per sample or per
    unit: sample ids, and for ``rows``/``chunks`` the units before each sample, are computed a span of
    ``span`` epoch positions (whole windows: shuffle windows, or a mixture's blocks) at a time when
    first needed, the last few spans kept. A span's first count is, per source, its draws before the
    span (:meth:`EpochOrder.draws`) counted from per-shard totals (the manifest's token counts for
    ``rows``; for ``chunks`` every shard's index is read once, at plan time) and the in-shard counts
    before them, since a window's total does not depend on its order (a mixture's draws into a
    window: their lengths). Unit blocks reach about a span's worth of samples, so an epoch of up to
    ``span`` samples is one block and one span.
    """

    def __init__(
        self, shards: ShardSet, order: EpochOrder, mode: str, seq_len: int, field: int = 0,
        unit_seed: Sequence[int] | None = None, span: int | None = None,
    ) -> None:
        if mode not in UNIT_MODES:
            raise ValueError(f"unknown unit mode {mode!r}")
        self.shards, self.order, self.mode, self.seq_len, self.field = shards, order, mode, seq_len, field
        self.windows_per_span = max(1, (span or SPAN_SAMPLES) // order.window)
        self.span = self.windows_per_span * order.window
        self.num_spans = -(-order.num_samples // self.span)
        self._spans: OrderedDict[int, tuple[np.ndarray, Any]] = OrderedDict()
        self._shard_counts: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._span_begins: dict[int, int] = {}
        if mode == "samples":
            self.num_units = order.num_samples
        else:
            self._shard_totals()
            total = self._units_before(order.num_samples)
            self.num_units = total if mode == "chunks" else max(0, total - 1) // seq_len
        block = self.span * self.num_units // max(1, order.num_samples)
        self.unit = UnitOrder(self.num_units, unit_seed, block)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers started with spawn recompute what they need
        return {**self.__dict__, "_spans": OrderedDict(), "_shard_counts": OrderedDict()}

    @property
    def blocked(self) -> bool:
        """Whether the epoch is ordered in blocks (units, or a mixture's samples): its order differs
        from order version 1's."""
        return self.unit.num_blocks > 1 or (self.order.layout is None and self.order.num_windows > 1)

    def _units(self, lengths: np.ndarray) -> np.ndarray:
        """Units of each sample of these lengths: its tokens (rows) or its pieces (chunks)."""
        return lengths if self.mode == "rows" else np.maximum(1, -(-lengths // self.seq_len))

    def _shard_totals(self) -> None:
        """Units of each shard of each source's layout, summed in layout order."""
        shards, token_fields = self.shards, [f for f in self.shards.fields if f not in NON_TOKEN_FIELDS]
        self._shard_start, self._shard_names = [], []
        for layout in self.order.layouts:
            infos = [shards.manifests[si].shards[shi] for si, shi in (shards._shard_paths[k] for k in layout.shard)]
            if self.mode == "rows" and token_fields == [shards.fields[self.field]]:
                totals = [info.tokens for info in infos]  # the manifest's counts: nothing read at start
            else:
                totals = [int(self._units(shards._index(int(k)).counts[:, self.field]).sum()) for k in layout.shard]
            start = np.zeros(len(totals) + 1, np.int64)
            np.cumsum(np.array(totals, np.int64), out=start[1:])
            self._shard_start.append(start)
            self._shard_names.append([f"{shards.manifests[shards._shard_paths[k][0]].root}/{info.name}"
                                      for k, info in zip(layout.shard, infos)])

    def _in_shard(self, source: int, k: int) -> np.ndarray:
        """Units up to and including each sample of shard ``k`` of a source's layout (a few shards kept)."""
        if (source, k) in self._shard_counts:
            self._shard_counts.move_to_end((source, k))
            return self._shard_counts[source, k]
        if len(self._shard_counts) >= 4 * BLOCKS_IN_FLIGHT:
            self._shard_counts.popitem(last=False)
        shard = int(self.order.layouts[source].shard[k])
        counts = np.cumsum(self._units(self.shards._index(shard).counts[:, self.field]))
        expected = int(self._shard_start[source][k + 1] - self._shard_start[source][k])
        if int(counts[-1]) != expected:
            raise ShardError(f"{self._shard_names[source][k]}: its index counts {int(counts[-1])} tokens, the "
                             f"manifest {expected}; run `tessera shard verify` on its directory")
        self._shard_counts[source, k] = counts
        return counts

    def _span_of(self, units: np.ndarray) -> np.ndarray:
        """The span that holds each unit. One source: the span of its shard's samples, or where a
        shard straddles spans, the one whose first unit it has reached; a mixture: found by bisection
        over the spans' first units."""
        if self.order.layout is None:
            out = np.empty_like(units)
            for i, unit in enumerate(units.tolist()):
                lo, hi = 0, self.num_spans - 1
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if self._span_begin(mid) <= unit else (lo, mid - 1)
                out[i] = lo
            return out
        start = self.order.layout.start
        k = np.searchsorted(self._shard_start[0], units, "right") - 1
        out, last = start[k] // self.span, (start[k + 1] - 1) // self.span
        for i in np.flatnonzero(last > out).tolist():
            out[i] += sum(int(units[i]) >= self._span_begin(s) for s in range(int(out[i]) + 1, int(last[i]) + 1))
        return out

    def _span_begin(self, s: int) -> int:
        """Units of the epoch before span ``s``."""
        if s not in self._span_begins:
            self._span_begins[s] = self._units_before(s * self.span)
        return self._span_begins[s]

    def _units_before(self, position: int) -> int:
        """Units of the epoch's first ``position`` samples (a span's start, or the epoch's end): per
        source, its draws before it, whole laps of it at its total and the rest from per-shard totals
        and its shard's counts before it (a window's total does not depend on the window's order),
        the units of a window's first draws (a mixture) from their lengths."""
        total = 0
        for source, draws in self.order.draws(position):
            layout = self.order.layouts[source]
            if not layout.num_samples:
                continue
            laps, draws = divmod(draws, layout.num_samples)
            aligned = draws // self.order.buffer * self.order.buffer
            k = int(np.searchsorted(layout.start, aligned, "right")) - 1
            local = aligned - int(layout.start[k])
            total += laps * int(self._shard_start[source][-1]) + int(self._shard_start[source][k])
            total += int(self._in_shard(source, k)[local - 1]) if local else 0
            if draws > aligned:
                total += int(self._units(self.order.source_ids(source, aligned, draws, self.field)[1]).sum())
        return total

    def _table(self, s: int) -> tuple[np.ndarray, Any]:
        """Span ``s``: the flat ids at its positions and (rows, chunks) the units before each position
        and after the last (the last ``3 * BLOCKS_IN_FLIGHT`` spans kept)."""
        if s in self._spans:
            self._spans.move_to_end(s)
            return self._spans[s]
        if len(self._spans) >= 3 * BLOCKS_IN_FLIGHT:
            self._spans.popitem(last=False)
        first = s * self.windows_per_span
        field = None if self.mode == "samples" else self.field
        ids, lengths = self.order.ids(first, first + self.windows_per_span, field)
        before = None
        if lengths is not None:
            before = np.empty(len(ids) + 1, np.int64)
            before[0] = self._span_begin(s)
            np.cumsum(self._units(lengths), out=before[1:])
            before[1:] += before[0]
        self._spans[s] = ids, before
        return ids, before

    def _by_span(self, positions: np.ndarray) -> Iterator[tuple[int, Any]]:
        """(span, selection of ``positions`` in it) for each span they fall in."""
        if self.num_spans <= 1:
            yield 0, slice(None)
            return
        spans = positions // self.span
        for s in np.unique(spans).tolist():
            yield s, spans == s

    def _find(self, units: np.ndarray) -> np.ndarray:
        """The position of the sample holding each unit (rows: token, chunks: piece)."""
        out = np.empty_like(units)
        for s, sel in self._by_span(self._span_of(units) * self.span if self.num_spans > 1 else units):
            out[sel] = s * self.span + np.searchsorted(self._table(s)[1], units[sel], "right") - 1
        return out

    def _ids_and_bounds(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat ids at ``positions`` and the units before and up to the end of each."""
        ids = np.empty(len(positions), np.int64)
        begin, end = np.empty_like(ids), np.empty_like(ids)
        for s, sel in self._by_span(positions):
            table, before = self._table(s)
            local = positions[sel] - s * self.span
            ids[sel], begin[sel], end[sel] = table[local], before[local], before[local + 1]
        return ids, begin, end

    def samples(self, positions: np.ndarray) -> np.ndarray:
        """The flat sample ids of the ``samples`` units at ``positions``."""
        p = np.asarray(self.unit(np.asarray(positions, np.int64)), np.int64)
        out = np.empty(len(p), np.int64)
        for s, sel in self._by_span(p):
            out[sel] = self._table(s)[0][p[sel] - s * self.span]
        return out

    def chunks(self, positions: np.ndarray) -> list[np.ndarray]:
        """The tokens of the ``chunks`` units at ``positions``: piece ``j`` of its sample."""
        units = np.asarray(self.unit(np.asarray(positions, np.int64)), np.int64)
        samples, begins, _ = self._ids_and_bounds(self._find(units))
        return [self.shards.read(sample, self.field)[j * self.seq_len : (j + 1) * self.seq_len]
                for sample, j in zip(samples.tolist(), (units - begins).tolist())]

    def rows(self, positions: np.ndarray, fields: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray]:
        """The ``rows`` units at ``positions``, gathered with numpy: ``[len(positions), seq_len + 1]``
        per field, and a bool array marking where a document begins inside each row (index 0 is
        marked when a document starts exactly there)."""
        units = np.asarray(self.unit(np.asarray(positions, np.int64)), np.int64)
        n = self.seq_len + 1
        begins = units * self.seq_len
        first, last = np.split(self._find(np.concatenate([begins, begins + n - 1])), 2)
        counts = last - first + 1
        row = np.repeat(np.arange(len(units)), counts)
        doc = np.repeat(first, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        sample, doc_begin, doc_end = self._ids_and_bounds(doc)
        seg_begin = np.maximum(doc_begin, begins[row])
        seg_len = np.minimum(doc_end, begins[row] + n) - seg_begin
        inside = seg_begin - doc_begin  # offset of the segment inside its document
        starts = np.zeros((len(units), n), bool)
        starts[row[inside == 0], (seg_begin - begins[row])[inside == 0]] = True
        out = [self.shards.gather(sample, inside, seg_len, f).reshape(len(units), n) for f in fields]
        return out, starts
