"""Supervised task files: text classification (``label<TAB>text``) and seq2seq pairs (SCAN's
``IN: <source> OUT: <target>``), parsed and encoded for the ``classification`` and ``seq2seq``
shard kinds; multiple-choice records (HellaSwag-style jsonl) for ``tessera eval --tasks``.

A classification sample is ``input_ids`` (BOS, the text, EOS: an encoder pools the first
position) and ``label`` (one integer: the index of its label in the manifest's ``labels`` list);
a seq2seq sample is ``source`` and ``target``, each ending with EOS (the decoder starts from the
pad token, as in T5). A malformed line is a one-line error naming ``file:line``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from data.readers import iter_records, open_text

TASK_KINDS = ("classification", "seq2seq")


@dataclasses.dataclass(frozen=True)
class LabelledText:
    label: str
    text: str


@dataclasses.dataclass(frozen=True)
class Pair:
    source: str
    target: str


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    with open_text(path) as f:  # undecodable bytes → U+FFFD; a file mostly of them is refused
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def read_classification(path: str | Path) -> Iterator[LabelledText]:
    """``label<TAB>text`` lines (blank lines skipped)."""
    path = Path(path)
    for number, line in _lines(path):
        label, tab, text = line.partition("\t")
        if not tab or not label.strip() or not text.strip():
            raise UserError(f"{path}:{number}: expected 'label<TAB>text', got {line[:60]!r}")
        yield LabelledText(label.strip(), text.strip())


def read_seq2seq(path: str | Path) -> Iterator[Pair]:
    """``IN: <source> OUT: <target>`` lines (blank lines skipped)."""
    path = Path(path)
    for number, line in _lines(path):
        head, sep, target = line.partition(" OUT: ")
        if not head.startswith("IN: ") or not sep or not head[4:].strip() or not target.strip():
            raise UserError(f"{path}:{number}: expected 'IN: <source> OUT: <target>', got {line[:60]!r}")
        yield Pair(head[4:].strip(), target.strip())


# the field names a multiple-choice record may use, first present wins: HellaSwag's own (ctx, endings,
# label as a string) and lm-evaluation-harness's processed documents (query, choices, gold) included
CHOICE_FIELDS = {"context": ("context", "query", "ctx"), "choices": ("choices", "endings"), "label": ("label", "gold")}


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """A context, its candidate continuations, and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    label: int


def read_multiple_choice(path: str | Path) -> list[MultipleChoice]:
    """Every record of a .jsonl/.json file of multiple-choice items (see :data:`CHOICE_FIELDS`); a
    malformed one is a one-line error naming ``file:line``."""
    if not Path(path).is_file():
        raise UserError(f"no such file: {path}")
    items = []
    for where, record in iter_records([path]):
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        found = {}
        for field, names in CHOICE_FIELDS.items():
            name = next((n for n in names if n in record), None)
            if name is None:
                raise UserError(f"{where}: no {field} field (one of {', '.join(names)})")
            found[field] = record[name]
        context, choices, label = found["context"], found["choices"], found["label"]
        if not isinstance(context, str):
            raise UserError(f"{where}: the context must be a string, got {type(context).__name__}")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError(f"{where}: the choices must be a list of at least two non-empty strings")
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise UserError(f"{where}: the label must be the index of the right choice (0 to {len(choices) - 1}), "
                            f"got {label!r}")
        items.append(MultipleChoice(context, tuple(choices), label))
    if not items:
        raise UserError(f"{path} holds no multiple-choice record")
    return items


def label_list(examples: Iterable[LabelledText], given: Sequence[str] | None = None) -> list[str]:
    """The labels in index order: ``given`` (every example's label must be in it), else sorted."""
    seen = {e.label for e in examples}
    if given is None:
        return sorted(seen)
    unknown = sorted(seen - set(given))
    if unknown:
        raise UserError(f"label {unknown[0]!r} is not in --labels {','.join(given)}")
    return list(given)


def task_items(inputs: Sequence[str], kind: str, labels: Sequence[str] | None = None
               ) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """(name, record) items for :func:`encode_task` and the manifest's extra keys (``labels``)."""
    if kind == "classification":
        examples = [(f"{Path(p).name}:{i}", e) for p in inputs for i, e in enumerate(read_classification(p))]
        names = label_list((e for _, e in examples), labels)
        index = {label: i for i, label in enumerate(names)}
        return [(name, (index[e.label], e.text)) for name, e in examples], {"labels": names}
    if kind == "seq2seq":
        pairs = [(f"{Path(p).name}:{i}", e) for p in inputs for i, e in enumerate(read_seq2seq(p))]
        return [(name, (e.source, e.target)) for name, e in pairs], {}
    raise UserError(f"unknown task kind {kind!r}; choose from {', '.join(TASK_KINDS)}")


def encode_task(kind: str, record: tuple[Any, Any], tokenizer: Any, max_len: int | None = None
                ) -> dict[str, np.ndarray]:
    """The arrays of one sample of ``kind``; texts are cut to ``max_len`` tokens (EOS kept)."""

    def cut(ids: list[int], room: int) -> list[int]:
        return ids if max_len is None else ids[: max(0, max_len - room)]

    if kind == "classification":
        label, text = record
        ids = [tokenizer.bos_id, *cut(tokenizer.encode(text), 2), tokenizer.eos_id]
        return {"input_ids": np.asarray(ids), "label": np.asarray([label])}
    source, target = ([*cut(tokenizer.encode(t), 1), tokenizer.eos_id] for t in record)
    return {"source": np.asarray(source), "target": np.asarray(target)}


def manifest_labels(shard_dir: str | Path) -> list[str]:
    """The label names of a classification shard directory, in index order."""
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"no shards at {shard_dir} (expected {path}; make them with tessera shard)")
    manifest = json.loads(path.read_text())
    labels = manifest.get("labels")
    if manifest.get("kind") != "classification" or not labels:
        raise UserError(f"{shard_dir} holds {manifest.get('kind')} shards; classification needs "
                        "`tessera shard --kind classification` (label<TAB>text lines)")
    return list(labels)
