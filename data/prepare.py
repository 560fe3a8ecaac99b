"""Preparation: raw documents → normalised, filtered, deduplicated ``documents.jsonl`` + ``report.json``.

Stages run per document in ``STAGES`` order (FineWeb's, with decontamination after the quality
filters): the URL block list, normalisation (an empty result is dropped as ``empty``), language
identification, the quality filters (:mod:`data.filters`), n-gram decontamination against
evaluation files, exact dedup, then MinHash near dedup (on batches of documents, in order, so the
outcome is that of one document at a time); the optional ones run when asked for. The report counts how
many documents each rule removed, keeps a few examples of each, and records the throughput.
Documents stream through one at a time: memory stays flat except for the dedup indexes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import UserError
from data import filters as filter_registry
from data.dedup import ExactDedup, MinHashDedup
from data.filters.decontamination import DEFAULT_NGRAM, Decontamination
from data.filters.language import DEFAULT_THRESHOLD, LanguageFilter
from data.filters.url import URLBlocklist
from data.pii import redact
from data.readers import Document, check_extractor, expand_inputs, is_warc, iter_documents, txt_modes
from data.text import TextView, normalize

STAGES = ("url_blocklist", "normalise", "language", "quality filters", "decontaminated", "exact_duplicate",
          "near_duplicate")
DEDUPS = ("exact", "minhash")
EXAMPLE_CHARS = 300
DEDUP_BATCH_CHARS = 200_000  # documents are deduplicated in batches of about this much text


def parse_dedup(spec: str | list[str]) -> list[str]:
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in DEDUPS:
            raise UserError(f"unknown dedup {name!r}; choose from {', '.join(DEDUPS)} or none")
    return names


@dataclass
class PrepSettings:
    """Every choice of a prep run, as data: the single-process run and each task of a cluster run
    build their stages from it (and a cluster run saves it in its plan)."""

    text_field: str = "text"
    txt_mode: str = "auto"
    extractor: str = "trafilatura"  # WARC pages' main text: a key of data.readers.EXTRACTORS
    filters: str | list[str] = "gopher,c4,fineweb"
    dedup: str | list[str] = "exact,minhash"
    unicode_form: str = "NFC"
    minhash_bands: int = 14
    minhash_rows: int = 8
    minhash_ngram: int = 5
    examples_per_rule: int = 3
    pii: bool = False
    languages: list[str] | None = None
    language_threshold: float = DEFAULT_THRESHOLD
    decontaminate: list[str] | None = None
    decontaminate_ngram: int = DEFAULT_NGRAM
    url_blocklist: str | None = None

    def __post_init__(self) -> None:
        self.decontaminate = [str(p) for p in self.decontaminate] if self.decontaminate else None
        self.url_blocklist = str(self.url_blocklist) if self.url_blocklist else None
        self.dedup = parse_dedup(self.dedup)
        check_extractor(self.extractor)

    def minhash(self) -> MinHashDedup | None:
        if "minhash" not in self.dedup:
            return None
        return MinHashDedup(ngram=self.minhash_ngram, bands=self.minhash_bands, rows=self.minhash_rows)


class Screen:
    """The per-document stages before dedup: URL block list, normalisation, language and quality
    filters, decontamination. ``screen(doc)`` is the rule that removes it or its kept view."""

    def __init__(self, settings: PrepSettings) -> None:
        self.settings = settings
        self.urls = URLBlocklist(settings.url_blocklist) if settings.url_blocklist else None
        self.filters = [
            *([LanguageFilter(settings.languages, settings.language_threshold)] if settings.languages else []),
            *filter_registry.build(settings.filters),
            *([Decontamination(settings.decontaminate, settings.decontaminate_ngram)] if settings.decontaminate
              else []),
        ]

    def __call__(self, doc: Document) -> str | TextView:
        blocked = self.urls(doc.meta.get("url")) if self.urls else None
        if blocked:
            return f"{self.urls.name}:{blocked}"
        return _filter(doc.text, self.settings.unicode_form, self.filters)


@dataclass
class Tally:
    """What a run (or one task of it) counted; tallies of consecutive parts add up to the whole
    run's, examples included (the first ones in document order)."""

    examples_per_rule: int
    seen: int = 0
    kept: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    removed: Counter[str] = field(default_factory=Counter)
    redacted: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # input records that gave no document
    invalid_utf8: Counter[str] = field(default_factory=Counter)  # per file: bytes replaced by U+FFFD
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def note(self, reason: str, doc_id: str, text: str) -> None:
        self.removed[reason] += 1
        if len(self.examples.setdefault(reason, [])) < self.examples_per_rule:
            self.examples[reason].append({"id": doc_id, "text": text[:EXAMPLE_CHARS]})

    def add(self, later: Tally) -> None:
        """Add the tally of the documents that come after this one's."""
        for name in ("seen", "kept", "bytes_in", "bytes_out"):
            setattr(self, name, getattr(self, name) + getattr(later, name))
        for name in ("removed", "redacted", "skipped", "invalid_utf8"):
            getattr(self, name).update(getattr(later, name))
        for reason, found in later.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(found[: self.examples_per_rule - len(mine)])

    def keep(self, doc_id: str, text: str, meta: dict[str, Any], pii: bool) -> str:
        """The output line of a kept document (redacted with ``pii``), counted."""
        redacted: Counter[str] = Counter()
        line, size = document_line(doc_id, text, meta, redacted if pii else None)
        self.count_kept(size, redacted)
        return line

    def count_kept(self, size: int, redacted: dict[str, int]) -> None:
        self.kept += 1
        self.bytes_out += size
        self.redacted.update(redacted)

    def to_json(self) -> dict[str, Any]:
        return {f.name: dict(v) if isinstance(v := getattr(self, f.name), Counter) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        counters = {k: Counter(data[k]) for k in ("removed", "redacted", "skipped", "invalid_utf8")}
        return cls(**{**data, **counters})


def document_line(doc_id: str, text: str, meta: dict[str, Any], redacted: Counter[str] | None) -> tuple[str, int]:
    """A kept document's line in ``documents.jsonl`` and its text's UTF-8 size; with ``redacted``, emails
    and IP addresses replaced (and counted there)."""
    text = text if redacted is None else redact(text, redacted)
    return json.dumps({"id": doc_id, "text": text, **meta}, ensure_ascii=False) + "\n", len(text.encode("utf-8"))


def screened(files: list, settings: PrepSettings, screen: Screen, tally: Tally
             ) -> Iterator[tuple[Document, TextView]]:
    """The documents of ``files`` that ``screen`` keeps; every document read is counted in ``tally`` and
    every one removed noted there with its reason. The one pass the single run and every task share."""
    for doc in iter_documents(files, text_field=settings.text_field, txt_mode=settings.txt_mode,
                              extractor=settings.extractor, skipped=tally.skipped, invalid_utf8=tally.invalid_utf8):
        tally.seen += 1
        tally.bytes_in += len(doc.text.encode("utf-8"))
        verdict = screen(doc)
        if isinstance(verdict, str):
            tally.note(verdict, doc.id, doc.text)
            continue
        yield doc, verdict


def prepare(inputs: Iterable[str | Path], out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Run the pipeline in this process and write ``out_dir/documents.jsonl`` and ``out_dir/report.json``;
    returns the report. ``options`` are :class:`PrepSettings`' fields."""
    inputs = expand_inputs(inputs)  # a missing input fails here, before anything is written
    settings = PrepSettings(**options)
    screen = Screen(settings)
    exact = ExactDedup() if "exact" in settings.dedup else None
    near = settings.minhash()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tally = Tally(settings.examples_per_rule)
    started = time.perf_counter()

    def flush() -> None:
        verdicts = _dedup([view.text for _, view in pending], exact, near)
        for (doc, view), reason in zip(pending, verdicts):
            if reason:
                tally.note(reason, doc.id, doc.text)
            else:
                sink.write(tally.keep(doc.id, view.text, doc.meta, settings.pii))
        pending.clear()

    pending: list[tuple[Document, TextView]] = []
    pending_chars = 0
    partial = out / "documents.jsonl.partial"  # renamed when complete: a failed run leaves no half file
    with partial.open("w", encoding="utf-8") as sink:
        for doc, verdict in screened(inputs, settings, screen, tally):
            pending.append((doc, verdict))
            pending_chars += len(verdict.text)
            if pending_chars >= DEDUP_BATCH_CHARS:
                flush()
                pending_chars = 0
        flush()
    if not tally.seen:
        partial.unlink()
        raise no_documents(inputs, tally)
    partial.replace(out / "documents.jsonl")
    report = build_report(inputs, settings, [f.name for f in screen.filters], tally,
                          txt_modes(inputs, settings.txt_mode), time.perf_counter() - started)
    write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def no_documents(inputs: list[Path], tally: Tally) -> UserError:
    gave = f" (records that gave no document: {dict(tally.skipped)})" if tally.skipped else ""
    return UserError(f"no documents in {', '.join(map(str, inputs))}: the inputs are empty{gave}")


def build_report(inputs: list[Path], settings: PrepSettings, filters: list[str], tally: Tally,
                 modes: dict[str, str], seconds: float) -> dict[str, Any]:
    """``report.json``: what came in, what each rule removed (with examples), what went out, and how fast."""
    s = settings
    return {
        "inputs": [str(p) for p in inputs],
        "txt_modes": modes,
        "extractor": s.extractor if any(is_warc(p) for p in inputs) else None,
        "documents_in": tally.seen, "documents_out": tally.kept,
        "skipped": dict(tally.skipped.most_common()), "removed": dict(tally.removed.most_common()),
        "examples": tally.examples,
        "invalid_utf8_bytes": dict(tally.invalid_utf8),
        "filters": filters, "dedup": s.dedup,
        "url_blocklist": s.url_blocklist,
        "languages": {"keep": s.languages, "threshold": s.language_threshold} if s.languages else None,
        "decontaminate": {"files": s.decontaminate, "ngram": s.decontaminate_ngram} if s.decontaminate else None,
        "pii_redacted": {"email": tally.redacted["email"], "ipv4": tally.redacted["ipv4"]} if s.pii else None,
        "minhash": {"ngram": s.minhash_ngram, "bands": s.minhash_bands, "rows": s.minhash_rows}
        if "minhash" in s.dedup else None,
        "bytes_in": tally.bytes_in, "bytes_out": tally.bytes_out, "seconds": round(seconds, 3),
        "mb_per_s": round(tally.bytes_in / 1e6 / seconds, 3) if seconds > 0 else None,
    }


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _filter(text: str, unicode_form: str, filters: list[filter_registry.Filter]) -> str | TextView:
    """The rule that removes the document, or its (possibly rewritten) view when the filters keep it."""
    view = TextView(normalize(text, unicode_form))
    if not view.text:
        return "empty"
    for f in filters:
        reason = f(view)
        if reason is not None:
            return f"{f.name}:{reason}"
    return view


def _dedup(texts: list[str], exact: ExactDedup | None, near: MinHashDedup | None) -> list[str | None]:
    """Per text, in order: the dedup that removes it, or None. Exact runs first; MinHash sees only
    what exact kept (signatures are computed for the whole batch at once)."""
    verdicts: list[str | None] = [exact.name if exact and exact.is_duplicate(t) else None for t in texts]
    if near is not None:
        survivors = [i for i, v in enumerate(verdicts) if v is None]
        for i, duplicate in zip(survivors, near.duplicates([texts[i] for i in survivors])):
            verdicts[i] = near.name if duplicate else None
    return verdicts
