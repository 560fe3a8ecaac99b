"""Corpus → shards: tokenize documents (text), conversations (sft, preference, unpaired, prompt) or task files
(classification, seq2seq: :mod:`data.tasks`) in parallel worker
processes and write them with :class:`data.shards.ShardWriter`, in input order."""

from __future__ import annotations

import itertools
import multiprocessing as mp
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from data.readers import iter_documents, iter_records
from data.shards import KINDS, ShardManifest, ShardWriter
from data.tasks import TASK_KINDS, encode_task, task_items
from data.tokenizer import TessTokenizer, load_tokenizer

CHUNK = 256
_worker: dict[str, Any] = {}


def parse_size(text: str | int) -> int:
    """``"64MB"``, ``"512K"``, ``"1G"`` or a plain byte count → bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if scale > 1 else s)
    except ValueError:
        raise UserError(f"bad size {text!r}; write e.g. 64MB, 512KB or 1000000") from None
    if value <= 0:
        raise UserError(f"bad size {text!r}; it must be positive")
    return int(value * scale)


def make_shards(
    inputs: list[str], tokenizer_dir: str | Path, out_dir: str | Path, *, kind: str = "text",
    shard_bytes: int = 64 << 20, append_eos: bool = False, add_bos: bool = False, text_field: str = "text",
    txt_mode: str = "auto", max_len: int | None = None, skip_bad: bool = False, metadata: bool = False,
    num_workers: int = 1, labels: list[str] | None = None, allow_empty: bool = False,
) -> tuple[ShardManifest, Counter[str]]:
    """Tokenize ``inputs`` and write shards of ``kind`` into ``out_dir``; returns the manifest and
    the counts of skipped records by reason (``skip_bad``: bad records and lines that are not JSON).
    ``labels`` fixes the label order of classification shards (default: sorted), so train and valid
    splits agree. ``allow_empty``: no samples make a manifest of no shards (a task's share)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    extra: dict[str, Any] = {}
    skipped: Counter[str] = Counter()
    invalid_utf8: Counter[str] = Counter()
    if kind == "text":
        items: Iterable[tuple[str, Any]] = (
            (d.id, d.text)
            for d in iter_documents(inputs, text_field=text_field, txt_mode=txt_mode, invalid_utf8=invalid_utf8)
        )
    elif kind in TASK_KINDS:
        items, extra = task_items(inputs, kind, labels)
    else:
        items = iter_records(inputs, skipped if skip_bad else None, invalid_utf8)
    writer = shard_writer(out_dir, tokenizer, tokenizer_dir, kind=kind, shard_bytes=shard_bytes,
                          append_eos=append_eos, add_bos=add_bos, extra=extra)
    options = {"kind": kind, "append_eos": append_eos, "add_bos": add_bos, "max_len": max_len, "skip_bad": skip_bad}
    for names, samples, reasons in _encode_chunks(items, str(tokenizer_dir), options, num_workers):
        skipped.update(reasons)
        for name, arrays in zip(names, samples):
            if arrays is not None:
                writer.write(arrays, {"id": name} if metadata else None)
    return close_writer(writer, skipped, invalid_utf8, allow_empty=allow_empty), skipped


def shard_writer(out_dir: str | Path, tokenizer: TessTokenizer, tokenizer_dir: str | Path, *, kind: str,
                 shard_bytes: int, append_eos: bool, add_bos: bool, extra: dict[str, Any]) -> ShardWriter:
    """The writer of ``make_shards`` (and of a task run's merge): its manifest's extra keys."""
    return ShardWriter(
        out_dir, kind=kind, vocab_size=tokenizer.vocab_size, tokenizer_sha256=tokenizer.sha256,
        shard_bytes=shard_bytes,
        extra={"tokenizer_path": str(Path(tokenizer_dir).resolve()), "append_eos": append_eos, "add_bos": add_bos,
               **extra},
    )


def close_writer(writer: ShardWriter, skipped: Counter[str], invalid_utf8: Counter[str], *,
                 allow_empty: bool = False) -> ShardManifest:
    """Close ``writer``; the manifest also counts bytes replaced per file and records skipped by reason."""
    manifest = writer.close(allow_empty=allow_empty)
    if invalid_utf8:  # replaced by U+FFFD, counted per file
        manifest.extra["invalid_utf8_bytes"] = dict(invalid_utf8)
    if skipped:
        manifest.extra["skipped"] = dict(skipped)
    if skipped or invalid_utf8:
        manifest.save()
    return manifest


def _encode_chunks(
    items: Iterable[tuple[str, Any]], tokenizer_dir: str, options: dict[str, Any], num_workers: int
) -> Iterator[tuple[list[str], list[dict[str, np.ndarray] | None], Counter[str]]]:
    chunks = (list(c) for c in _batched(items, CHUNK))
    if num_workers <= 1:
        _init(tokenizer_dir, options)
        yield from map(_encode_chunk, chunks)
        return
    # an executor, unlike multiprocessing.Pool, fails instead of waiting forever when a worker dies;
    # a bounded window of chunks in flight keeps memory flat and the output in input order
    context = mp.get_context("fork")
    with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init,
                             initargs=(tokenizer_dir, options)) as pool:
        window: deque[Future] = deque()
        try:
            for chunk in chunks:
                window.append(pool.submit(_encode_chunk, chunk))
                if len(window) >= 2 * num_workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        except BrokenProcessPool:
            raise UserError("a tokenizing worker process died (out of memory or killed); "
                            "rerun with fewer --workers") from None


def _batched(items: Iterable[Any], n: int) -> Iterator[tuple[Any, ...]]:
    it = iter(items)
    while chunk := tuple(itertools.islice(it, n)):
        yield chunk


def _init(tokenizer_dir: str, options: dict[str, Any]) -> None:
    _worker["tokenizer"] = load_tokenizer(tokenizer_dir)
    _worker.update(options)


def _encode_chunk(chunk: list[tuple[str, Any]]) -> tuple[list[str], list[dict[str, np.ndarray] | None], Counter[str]]:
    tok: TessTokenizer = _worker["tokenizer"]
    names = [name for name, _ in chunk]
    if _worker["kind"] == "text":
        ids = tok.encode_batch([text for _, text in chunk])
        bos = [tok.bos_id] if _worker["add_bos"] else []
        eos = [tok.eos_id] if _worker["append_eos"] else []
        return names, [{"tokens": np.asarray(bos + t + eos)} if t else None for t in ids], Counter()
    if _worker["kind"] in TASK_KINDS:
        return names, [encode_task(_worker["kind"], record, tok, _worker["max_len"]) for _, record in chunk], Counter()
    from data.conversations import BadRecord, encode_preference, encode_prompt, encode_sft, encode_unpaired

    encode = {"sft": encode_sft, "preference": encode_preference, "prompt": encode_prompt,
              "unpaired": encode_unpaired}[_worker["kind"]]
    fields = KINDS[_worker["kind"]]
    out: list[dict[str, np.ndarray] | None] = []
    skipped: Counter[str] = Counter()
    for name, record in chunk:
        try:
            arrays = encode(record, tok, max_len=_worker["max_len"], name=name)
            out.append({f: np.frombuffer(a, np.uint8) if isinstance(a, bytes) else np.asarray(a)
                        for f, a in zip(fields, arrays)})
        except BadRecord as exc:
            if not _worker["skip_bad"]:
                raise UserError(str(exc)) from None  # BadRecord does not survive pickling back to the parent
            skipped[exc.reason] += 1
            out.append(None)
    return names, out, skipped
