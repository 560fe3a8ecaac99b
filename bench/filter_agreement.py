"""Our quality filters against datatrove's on the same documents (a benchmark, not a test).

Each filter runs on its own over every document of the English pretraining corpora (../shared/data,
else examples/data), read and normalised as ``tessera prep`` does. Per filter it reports how often
the two agree on keep/remove, which (our rule, their rule) pairs the disagreements come from, with an
example of each, and for C4 how often the lines both keep are the same. C4 is compared twice: as we
run it (``filter_no_terminal_punct=False``, the FineWeb recipe) and with datatrove's own default.

datatrove 0.10 and spaCy (its English word splitter; no model download) come with the dev extra
(``pip install -e '.[dev]'``). From the repository root::

    PYTHONPATH=. python bench/filter_agreement.py [--max-docs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ["pretrain_tinyshakespeare.txt", "pretrain_war_and_peace.txt", "pretrain_tinystories_valid_head.txt",
           "pretrain_wikipedia_demo.txt", "pretrain_c4_demo.jsonl"]
EXAMPLE_CHARS = 160


def corpus(max_docs: int | None) -> list[tuple[str, str]]:
    """(id, normalised text) of the non-empty documents, as prep hands them to the filters."""
    from data.readers import iter_documents
    from data.text import normalize

    for folder in (ROOT.parent / "shared" / "data", ROOT / "examples" / "data"):
        files = [folder / name for name in CORPORA if (folder / name).is_file()]
        if files:
            break
    else:
        sys.exit("no corpus found in ../shared/data or examples/data")
    docs = []
    for file in files:
        texts = ((d.id, normalize(d.text)) for d in iter_documents([file]))
        docs += [(doc_id, text) for doc_id, text in texts if text][:max_docs]
    return docs


def pairs() -> dict[str, tuple[Any, Any]]:
    """Filter name → (ours, datatrove's), both configured as Tessera claims."""
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter
    from datatrove.pipeline.filters import GopherRepetitionFilter as TheirRepetition

    from data.filters.c4 import C4Filter
    from data.filters.fineweb import FineWebFilter
    from data.filters.gopher_quality import GopherQualityFilter as OurQuality
    from data.filters.gopher_repetition import GopherRepetitionFilter

    return {
        "gopher_repetition": (GopherRepetitionFilter(), TheirRepetition()),
        "gopher_quality": (OurQuality(), GopherQualityFilter()),
        "fineweb": (FineWebFilter(), FineWebQualityFilter()),
        "c4": (C4Filter(), C4QualityFilter(filter_no_terminal_punct=False)),
        "c4 (terminal punctuation rule on)": (C4Filter(filter_no_terminal_punct=True), C4QualityFilter()),
    }


class Tally:
    """One filter's agreement with its datatrove twin, document by document."""

    def __init__(self) -> None:
        self.documents = self.agree = self.both_kept = self.same_text = 0
        self.removed = {"ours": 0, "datatrove": 0}
        self.mismatches: Counter[str] = Counter()
        self.examples: dict[str, dict[str, str]] = {}

    def add(self, doc_id: str, text: str, ours: Any, theirs: Any) -> None:
        from datatrove.data import Document

        from data.text import TextView

        view, doc = TextView(text), Document(text=text, id=doc_id)
        our_reason = ours(view)
        result = theirs.filter(doc)
        their_reason = None if result is True else (result[1] if isinstance(result, tuple) else "removed")
        self.documents += 1
        self.removed["ours"] += our_reason is not None
        self.removed["datatrove"] += their_reason is not None
        if (our_reason is None) == (their_reason is None):
            self.agree += 1
            if our_reason is None:
                self.both_kept += 1
                self.same_text += view.text == doc.text
            return
        key = f"ours {our_reason or 'keep'} / datatrove {their_reason or 'keep'}"
        self.mismatches[key] += 1
        self.examples.setdefault(key, {"id": doc_id, "text": text[:EXAMPLE_CHARS]})

    def summary(self) -> dict[str, Any]:
        return {
            "documents": self.documents, "agreement": self.agree / self.documents, "removed": self.removed,
            "both_kept_same_text": self.same_text / self.both_kept if self.both_kept else None,
            "mismatches": dict(self.mismatches.most_common()), "examples": self.examples,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-docs", type=int, default=None, help="only the first N documents of each corpus")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    docs = corpus(args.max_docs)
    print(f"{len(docs)} documents, {sum(len(t) for _, t in docs) / 1e6:.1f} M characters")
    filters = pairs()
    tallies = {name: Tally() for name in filters}
    start = time.perf_counter()
    for doc_id, text in docs:  # all filters on one document in turn: datatrove caches its word split per text
        for name, (ours, theirs) in filters.items():
            tallies[name].add(doc_id, text, ours, theirs)
    print(f"{time.perf_counter() - start:.0f} s")
    results = {name: tally.summary() for name, tally in tallies.items()}
    for name, r in results.items():
        same = f", same kept text {r['both_kept_same_text']:.2%}" if name.startswith("c4") else ""
        print(f"\n{name}: agreement {r['agreement']:.2%} (removed: ours {r['removed']['ours']}, "
              f"datatrove {r['removed']['datatrove']}){same}")
        for key, count in r["mismatches"].items():
            print(f"  {count:6d}  {key}   e.g. {r['examples'][key]['id']}: {r['examples'][key]['text'][:80]!r}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
