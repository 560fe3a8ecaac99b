"""The data loader the trainer uses: ``build_loader(cfg, objective=..., ...)`` → :class:`Loader`.

A :class:`Loader` iterates batches (``dict[str, torch.Tensor]``, keys per objective in
:mod:`data.collate`) forever for ``split="train"`` (epochs roll over) and once over the data for
``split="valid"`` (every rank gets the same number of batches; the last may be short).

Resuming: ``state_dict()`` is a few integers that are **the same on every rank** (all ranks consume
in lockstep; see :mod:`data.stream`). Save any rank's copy; ``load_state_dict(state)`` on any world
size and any micro-batch size continues with exactly the units not yet consumed. A list of states
(one per old rank) is accepted too. Changing ``seq_len``, the seed or the data is refused; a state
saved under another order version (``ORDER_VERSION``) into an epoch it orders differently is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from data.collate import (
    IGNORE_INDEX,
    collate_classification,
    collate_mlm,
    collate_preference,
    collate_prompt,
    collate_rows,
    collate_seq2seq,
    collate_sft,
    collate_span,
    collate_unpaired,
)
from data.config import DataConfig
from data.epoch_plan import ORDER_VERSION
from data.shard_set import ShardSet, Source
from data.stream import SampleStream, StreamState

Batch = dict[str, torch.Tensor]
STATE_VERSION = 1
log = logging.getLogger("tessera.data")


@dataclasses.dataclass(frozen=True)
class DataObjective:
    """How the loader batches one objective (``Objective.data_objective`` names the row)."""

    shard_kind: str  # what `tessera shard --kind` made the shards it reads
    unit: str  # the stream's unit: rows (packed), chunks (fixed windows) or samples (one per record)
    token_level: bool  # its loss is a mean token cross-entropy, so exp(loss) is a perplexity
    # samples: collate(arrays, pad_id=, seq_len=) -> Batch (+ reference_logps=, the precomputed ones)
    collate: Callable[..., Batch] | None = None
    reference_logps: bool = False


DATA_OBJECTIVES = {
    "clm": DataObjective("text", "rows", token_level=True),
    # mlm keeps one document's windows: packed rows measured worse against BertForMaskedLM (300 steps,
    # 0.878x -> 0.996x; learned positions then start mid-document). span reads packed rows, each
    # corrupted as one sequence (Batcher._corrupt): 1.067x -> 1.042x against T5 (bench/RESULTS.md)
    "mlm": DataObjective("text", "chunks", token_level=True),
    "span": DataObjective("text", "rows", token_level=True),
    "sft": DataObjective("sft", "samples", token_level=True, collate=collate_sft),  # rows under data.packing
    "preference": DataObjective("preference", "samples", token_level=False, collate=collate_preference,
                                reference_logps=True),
    "classify": DataObjective("classification", "samples", token_level=False, collate=collate_classification),
    "seq2seq": DataObjective("seq2seq", "samples", token_level=True, collate=collate_seq2seq),
    # online alignment: rollouts come later
    "prompt": DataObjective("prompt", "samples", token_level=False, collate=collate_prompt),
    "unpaired": DataObjective("unpaired", "samples", token_level=False, collate=collate_unpaired),  # KTO
}


def build_loader(
    cfg: DataConfig, *, objective: str, tokenizer: Any, rank: int, world_size: int, micro_batch_size: int,
    seed: int, split: str = "train",
) -> Loader:
    """The batches of ``objective`` for this rank. ``cfg.seed`` (when set) overrides ``seed``."""
    if objective not in DATA_OBJECTIVES:
        raise UserError(f"unknown data objective {objective!r}; choose from {', '.join(DATA_OBJECTIVES)}")
    spec = DATA_OBJECTIVES[objective]
    if split not in ("train", "valid"):
        raise UserError(f"unknown split {split!r}; use train or valid")
    if micro_batch_size < 1:
        raise UserError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    if split == "train":
        sources = [Source(d.path, d.weight) for d in cfg.datasets()]
    elif cfg.valid:
        sources = [Source(cfg.valid)]
    else:
        raise UserError("data.valid is not set: give a shard directory to evaluate on")
    shards = ShardSet(sources, on_corrupt=str(cfg.on_corrupt), verify_checksums=cfg.verify_checksums,
                      allow_pipe=cfg.allow_pipe)
    if shards.kind != spec.shard_kind:
        raise UserError(f"{sources[0].path} holds {shards.kind} shards; the {objective} objective needs "
                        f"{spec.shard_kind} shards (tessera shard --kind {spec.shard_kind})")
    if getattr(tokenizer, "sha256", shards.manifests[0].tokenizer_sha256) != shards.manifests[0].tokenizer_sha256:
        raise UserError(f"{sources[0].path} was tokenized with another tokenizer than {tokenizer.path}")
    mode = "rows" if objective == "sft" and cfg.packing else spec.unit
    train = split == "train"
    stream = SampleStream(
        shards, mode=mode, seq_len=cfg.seq_len, seed=cfg.seed if cfg.seed is not None else seed, rank=rank,
        world_size=world_size, batch_size=micro_batch_size, shuffle=cfg.shuffle and train,
        shuffle_buffer=cfg.shuffle_buffer, epochs=None if train else 1,
    )
    batcher = Batcher(objective, cfg, _TokenIds.of(tokenizer))
    return Loader(stream, batcher, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor)


def count_target_tokens(batch: Batch) -> int:
    """Positions that carry a loss (labels other than -100), over every ``*labels`` key."""
    return sum(int((v != IGNORE_INDEX).sum()) for k, v in batch.items() if k.endswith("labels"))


def count_input_tokens(batch: Batch) -> int:
    """Tokens the model reads (padding excluded): for tokens/s."""
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    if masks:
        return sum(int(m.sum()) for m in masks)
    return int(batch["input_ids"].numel())


@dataclasses.dataclass(frozen=True)
class _TokenIds:
    """The ids collators need, without the tokenizer object (cheap to send to worker processes)."""

    pad: int
    eos: int
    mask: int
    vocab_size: int
    special: tuple[int, ...]
    sentinels: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer: Any) -> _TokenIds:
        return cls(tokenizer.pad_id, tokenizer.eos_id, tokenizer.mask_id, tokenizer.vocab_size,
                   tuple(sorted(tokenizer.special_ids)), tuple(tokenizer.sentinel_ids))


class Batcher:
    """Reads a batch's units from the stream and collates them for one objective."""

    def __init__(self, objective: str, cfg: DataConfig, ids: _TokenIds) -> None:
        self.objective, self.cfg, self.ids = objective, cfg, ids
        self.spec = DATA_OBJECTIVES[objective]
        if objective == "span" and not ids.sentinels:
            raise UserError("span corruption needs sentinel tokens; train the tokenizer with them")

    def __call__(self, stream: SampleStream, pieces: Sequence[tuple[int, np.ndarray]]) -> Batch | PackedRows:
        if stream.mode == "rows" and self.objective not in ("mlm", "span"):
            return self._rows(stream, pieces)
        units = [(epoch, int(u)) for epoch, positions in pieces for u in positions]
        if stream.mode == "rows":
            rows = [stream.plan(e).rows(u, (0,))[0][0][:, : stream.seq_len] for e, u in pieces]
            return self._corrupt(stream, list(np.concatenate(rows)), units)
        if stream.mode == "chunks":
            return self._corrupt(stream, [c for e, u in pieces for c in stream.plan(e).chunks(u)], units)
        samples = [s for e, u in pieces for s in stream.plan(e).samples(u).tolist()]
        shards = stream.shards
        arrays = [tuple(shards.read(s, f) for f in range(len(shards.fields))) for s in samples]
        if not self.spec.reference_logps:
            return self.spec.collate(arrays, pad_id=self.ids.pad, seq_len=self.cfg.seq_len)
        logps = None if shards.reference_logps is None else shards.reference_logps[samples]
        return self.spec.collate(arrays, pad_id=self.ids.pad, seq_len=self.cfg.seq_len, reference_logps=logps)

    def _corrupt(self, stream: SampleStream, pieces: list[np.ndarray], units: list[tuple[int, int]]) -> Batch:
        """MLM masking or span corruption of each piece (chunk or row), seeded by its (epoch, position).

        A packed row (``rows``: ``seq_len`` tokens of the document stream, several documents each
        closed by the shards' EOS, the overlap token dropped so rows tile the stream) is corrupted as
        one sequence with no document masks: T5's own pretraining (``group_texts`` rows). Sentinels
        are numbered over the row, so each target span stays unambiguous to the decoder's
        cross-attention; per-document corruption would restart them in every document, and nothing
        masks cross-attention by document."""
        rngs = [np.random.default_rng([stream.seed, e, u, 0xA5C]) for e, u in units]
        if self.objective == "mlm":
            return collate_mlm(
                pieces, rngs, pad_id=self.ids.pad, mask_id=self.ids.mask, special_ids=np.array(self.ids.special),
                vocab_size=self.ids.vocab_size, probability=self.cfg.mlm_probability,
                mask_fraction=self.cfg.mlm_mask_fraction, random_fraction=self.cfg.mlm_random_fraction,
            )
        return collate_span(pieces, rngs, pad_id=self.ids.pad, eos_id=self.ids.eos, sentinel_ids=self.ids.sentinels,
                            density=self.cfg.span_noise_density, mean_span=self.cfg.span_mean_length)

    def _rows(self, stream: SampleStream, pieces: Sequence[tuple[int, np.ndarray]]) -> PackedRows:
        fields = (0, 1) if self.objective == "sft" else (0,)
        parts = [stream.plan(epoch).rows(units, fields) for epoch, units in pieces]
        arrays = [np.concatenate([p[0][f] for p in parts]) for f in range(len(fields))]
        starts = np.concatenate([p[1] for p in parts])
        return PackedRows(arrays[0], starts, arrays[1] if len(fields) == 2 else None)


@dataclasses.dataclass
class PackedRows:
    """Rows as read (tokens in the shard's dtype, document starts, loss mask): what a worker sends.
    Labels, document and position ids are made by :func:`collate_rows` in the receiving process,
    so a batch crosses processes in a tenth of the bytes."""

    tokens: Any
    starts: Any
    loss_mask: Any = None

    def collate(self) -> Batch:
        def plain(a: Any) -> np.ndarray | None:
            return a.numpy() if isinstance(a, torch.Tensor) else a

        return collate_rows(plain(self.tokens), plain(self.starts), plain(self.loss_mask))


class _Batches(torch.utils.data.IterableDataset):
    """The DataLoader's dataset: worker ``w`` of ``K`` makes this rank's batches ``j ≡ w (mod K)``."""

    def __init__(self, stream: SampleStream, batcher: Batcher, start: StreamState) -> None:
        self.stream, self.batcher, self.start = stream, batcher, start

    def __iter__(self) -> Iterator[Batch | PackedRows | tuple]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for pieces in self.stream.batches(self.start, worker, workers):
            batch = self.batcher(self.stream, pieces)
            yield batch if info is None or isinstance(batch, PackedRows) else _pack(batch)


def _pack(batch: Batch) -> tuple[list[str], list[tuple[int, ...]], torch.Tensor, Batch]:
    """A worker's batch as one flat int64 tensor (plus the other tensors): the DataLoader moves each
    tensor through its own shared-memory segment, and that per-tensor cost, not the bytes, bounds
    the loader's speed."""
    names = [k for k, v in batch.items() if v.dtype == torch.int64]
    flat = torch.cat([batch[k].reshape(-1) for k in names])
    return names, [tuple(batch[k].shape) for k in names], flat, {k: v for k, v in batch.items() if k not in names}


def _unpack(item: Batch | PackedRows | tuple) -> Batch:
    if isinstance(item, dict):
        return item
    if isinstance(item, PackedRows):
        return item.collate()
    names, shapes, flat, rest = item
    sizes = [math.prod(shape) for shape in shapes]
    parts = {k: part.view(shape) for k, part, shape in zip(names, flat.split(sizes), shapes)}
    return {**parts, **rest}


class Loader:
    """Iterable of batches with an exact, world-size-independent ``state_dict``."""

    def __init__(self, stream: SampleStream, batcher: Batcher, *, num_workers: int = 0, prefetch_factor: int = 2):
        self.stream, self.batcher = stream, batcher
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self._start = StreamState()
        self._yielded = 0

    @property
    def finite(self) -> bool:
        return self.stream.epochs is not None

    @property
    def skipped_shards(self) -> list[str]:
        """Shards left out as corrupt (with ``on_corrupt=skip``), one message each."""
        return list(self.stream.shards.skipped)

    @property
    def num_shards(self) -> int:
        """Shards listed by the manifests, skipped ones included."""
        return sum(len(m.shards) for m in self.stream.shards.manifests)

    def __len__(self) -> int:
        """Batches per pass (evaluation) or per epoch (training, from epoch 0)."""
        units = self.stream.plan(0).num_units // self.stream.world_size
        return -(-units // self.stream.batch_size) if self.finite else units // self.stream.batch_size

    def __iter__(self) -> Iterator[Batch]:
        """Training: continues from the current state (a new iterator resumes where the last one
        stopped). Evaluation: one full pass every time."""
        if self.finite:
            self._start, self._yielded = StreamState(), 0
        else:
            self._start, self._yielded = self._current(), 0
        loader = torch.utils.data.DataLoader(
            _Batches(self.stream, self.batcher, self._start), batch_size=None, num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            pin_memory=torch.cuda.is_available(),
        )
        for item in loader:
            self._yielded += 1
            yield _unpack(item)

    def state_dict(self) -> dict[str, Any]:
        state = self._current()
        return {"version": STATE_VERSION, "epoch": state.epoch, "consumed": state.consumed, "seed": self.stream.seed,
                "unit": f"{self.stream.mode}:{self.stream.seq_len}", "data": self.stream.shards.fingerprint(),
                "order": ORDER_VERSION}

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        if not isinstance(state, dict):  # one state per old rank: they are all the same
            states = list(state)
            if not states or any(s != states[0] for s in states):
                raise UserError("the saved data-loader states of the ranks disagree; the checkpoint is inconsistent")
            state = states[0]
        expected = self.state_dict()
        for key, what in (("version", "format version"), ("unit", "unit (mode:seq_len)"), ("seed", "seed"),
                          ("data", "data fingerprint")):
            if state.get(key) != expected[key]:
                raise UserError(f"cannot resume the data loader: the checkpoint's {what} is {state.get(key)!r}, "
                                f"this run's is {expected[key]!r}")
        self._start, self._yielded = StreamState(int(state["epoch"]), int(state["consumed"])), 0
        self._warn_if_reordered(state.get("order", 1))

    def _warn_if_reordered(self, order: int) -> None:
        """One line when the state was saved under another order version in an epoch that version orders
        differently: the rest of that epoch is read in this code's order, so some units already read come
        again and as many are missed (once; later epochs are whole). Logged, not refused: the effect is
        bounded by one epoch's remainder, and refusing would leave the run no way on but to start over."""
        start = self._start
        if order == ORDER_VERSION or self.finite or not start.consumed:
            return
        plan = self.stream.plan(start.epoch)
        if not plan.blocked:
            return
        total = plan.num_units
        log.warning("the data-loader state was saved by order version %d, this code's is %d, which orders epoch %d "
                    "(%d %s) differently: its remaining %d units are read in the new order, so about %d of the %d "
                    "already read come again and as many are missed; later epochs are unaffected",
                    order, ORDER_VERSION, start.epoch, total, self.stream.mode, total - start.consumed,
                    start.consumed * (total - start.consumed) // total, start.consumed)

    def _current(self) -> StreamState:
        if self.finite:
            return StreamState()
        return self.stream.advance(self._start, self._yielded)
