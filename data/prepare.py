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

import json
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.errors import UserError
from data import filters as filter_registry
from data.dedup import ExactDedup, MinHashDedup
from data.filters.decontamination import DEFAULT_NGRAM, Decontamination
from data.filters.language import DEFAULT_THRESHOLD, LanguageFilter
from data.filters.url import URLBlocklist
from data.pii import redact
from data.readers import Document, expand_inputs, iter_documents, txt_modes
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


def prepare(
    inputs: Iterable[str | Path], out_dir: str | Path, *, text_field: str = "text", txt_mode: str = "auto",
    filters: str | list[str] = "gopher,c4,fineweb", dedup: str | list[str] = "exact,minhash",
    unicode_form: str = "NFC", minhash_bands: int = 14, minhash_rows: int = 8, minhash_ngram: int = 5,
    examples_per_rule: int = 3, pii: bool = False, languages: list[str] | None = None,
    language_threshold: float = DEFAULT_THRESHOLD, decontaminate: list[str | Path] | None = None,
    decontaminate_ngram: int = DEFAULT_NGRAM, url_blocklist: str | Path | None = None,
) -> dict[str, Any]:
    """Run the pipeline and write ``out_dir/documents.jsonl`` and ``out_dir/report.json``; returns the report."""
    inputs = expand_inputs(inputs)  # a missing input fails here, before anything is written
    urls = URLBlocklist(url_blocklist) if url_blocklist else None
    chosen_filters = [
        *([LanguageFilter(languages, language_threshold)] if languages else []),
        *filter_registry.build(filters),
        *([Decontamination(decontaminate, decontaminate_ngram)] if decontaminate else []),
    ]
    dedups = parse_dedup(dedup)
    exact = ExactDedup() if "exact" in dedups else None
    near = MinHashDedup(ngram=minhash_ngram, bands=minhash_bands, rows=minhash_rows) if "minhash" in dedups else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    removed: Counter[str] = Counter()
    redacted: Counter[str] = Counter()
    skipped: Counter[str] = Counter()  # input records that gave no document (WARC: not HTML, not 200, cut short)
    invalid_utf8: Counter[str] = Counter()  # per file: bytes that were not UTF-8, replaced by U+FFFD
    examples: dict[str, list[dict[str, str]]] = {}
    seen = kept = bytes_in = bytes_out = 0
    started = time.perf_counter()

    def flush() -> None:
        nonlocal kept, bytes_out
        verdicts = _dedup([view.text for _, view in pending], exact, near)
        for (doc, view), reason in zip(pending, verdicts):
            if reason:
                note(reason, doc)
                continue
            kept += 1
            text = redact(view.text, redacted) if pii else view.text
            bytes_out += len(text.encode("utf-8"))
            sink.write(json.dumps({"id": doc.id, "text": text, **doc.meta}, ensure_ascii=False) + "\n")
        pending.clear()

    def note(reason: str, doc: Document) -> None:
        removed[reason] += 1
        if len(examples.setdefault(reason, [])) < examples_per_rule:
            examples[reason].append({"id": doc.id, "text": doc.text[:EXAMPLE_CHARS]})

    pending: list[tuple[Document, TextView]] = []
    pending_chars = 0
    partial = out / "documents.jsonl.partial"  # renamed when complete: a failed run leaves no half file
    with partial.open("w", encoding="utf-8") as sink:
        for doc in iter_documents(inputs, text_field=text_field, txt_mode=txt_mode, skipped=skipped,
                                  invalid_utf8=invalid_utf8):
            seen += 1
            bytes_in += len(doc.text.encode("utf-8"))
            blocked = urls(doc.meta.get("url")) if urls else None
            verdict = f"{urls.name}:{blocked}" if blocked else _filter(doc.text, unicode_form, chosen_filters)
            if isinstance(verdict, str):
                note(verdict, doc)
                continue
            pending.append((doc, verdict))
            pending_chars += len(verdict.text)
            if pending_chars >= DEDUP_BATCH_CHARS:
                flush()
                pending_chars = 0
        flush()
    if not seen:
        partial.unlink()
        gave = f" (records that gave no document: {dict(skipped)})" if skipped else ""
        raise UserError(f"no documents in {', '.join(map(str, inputs))}: the inputs are empty{gave}")
    partial.replace(out / "documents.jsonl")
    seconds = time.perf_counter() - started
    report = {
        "inputs": [str(p) for p in inputs],
        "txt_modes": txt_modes(inputs, txt_mode),
        "documents_in": seen, "documents_out": kept,
        "skipped": dict(skipped.most_common()), "removed": dict(removed.most_common()), "examples": examples,
        "invalid_utf8_bytes": dict(invalid_utf8),
        "filters": [f.name for f in chosen_filters], "dedup": dedups,
        "url_blocklist": str(url_blocklist) if url_blocklist else None,
        "languages": {"keep": languages, "threshold": language_threshold} if languages else None,
        "decontaminate": {"files": [str(p) for p in decontaminate], "ngram": decontaminate_ngram}
        if decontaminate else None,
        "pii_redacted": {"email": redacted["email"], "ipv4": redacted["ipv4"]} if pii else None,
        "minhash": {"ngram": minhash_ngram, "bands": minhash_bands, "rows": minhash_rows} if near else None,
        "bytes_in": bytes_in, "bytes_out": bytes_out, "seconds": round(seconds, 3),
        "mb_per_s": round(bytes_in / 1e6 / seconds, 3) if seconds > 0 else None,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


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
