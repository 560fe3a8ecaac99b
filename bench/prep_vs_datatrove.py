"""The whole per-document prep, Tessera vs datatrove 0.10, on the same WARC in one run (a benchmark, not a test).

Input: the pages of :mod:`bench.web_pages` (shipped articles in varied boilerplate, some repeated or nearly
repeated) as one gzipped WARC of HTTP 200 text/html responses. Both sides run the same steps with the same
settings: WARC reading, trafilatura main text (precision favoured, no comments, no cross-document dedup),
the Gopher repetition and quality, C4 (``filter_no_terminal_punct=False``) and FineWeb filters, MinHash
signatures (word 5-grams, 14 bands × 8 rows). Tessera: ``data.prepare.prepare`` as ``tessera prep
--filters gopher,c4,fineweb --dedup minhash`` runs it (its near dedup and output file included); datatrove:
``WarcReader → Trafilatura → GopherRepetitionFilter → GopherQualityFilter → C4QualityFilter →
FineWebQualityFilter → MinhashDedupSignature``, chained in this process as its executor chains them (its
extractor runs pages in a sandbox process, as it always does; per-page timeout raised from 1 s to 10 s so
that load on a shared machine cannot drop a page). Speed: MB of HTML per CPU-second of all the side's
processes (= per core), the sides alternating repetition by repetition, medians; ratios are what to read on
a shared machine. One more row runs ``tessera prep --extractor resiliparse`` (no datatrove peer at these
settings: its Trafilatura step is what both sides share); one times the WARC reading and trafilatura alone,
the step both sides share, whose speed bounds how far ahead of datatrove a prep that extracts with it can
be. Agreement (untimed): per page, kept or removed by the filters; after near dedup (datatrove's buckets
and clustering stages run on its signatures); the kept text where both keep. ``--profile``: where
Tessera's time goes (cProfile). Run from the repository root (the dev extra has datatrove 0.10, spaCy,
faust-cchardet, python-magic)::

    PYTHONPATH=. python bench/prep_vs_datatrove.py [--reps 3] [--json PATH] [--profile] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.web_pages import build_pages, write_warc

FILTERS = "gopher,c4,fineweb"
TIMEOUT_S = 10


def cpu_now() -> float:
    """CPU seconds of this process and its reaped children (datatrove's extraction sandbox)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tessera(warc: Path, out: Path, dedup: str = "minhash", extractor: str = "trafilatura") -> dict[str, str]:
    """url → kept text of ``tessera prep --extractor EXTRACTOR``'s documents."""
    from data.prepare import prepare

    prepare([warc], out, filters=FILTERS, dedup=dedup, extractor=extractor)
    with (out / "documents.jsonl").open() as f:
        return {d["url"]: d["text"] for d in map(json.loads, f)}


def extraction_only(warc: Path, out: Path) -> dict[str, str]:
    """url → main text: the WARC reading and trafilatura alone, as ``tessera prep`` runs them (the step both
    sides share: datatrove's time over this one's is the most any per-core speedup can reach with it)."""
    from data.readers import iter_documents

    return {d.meta["url"]: d.text for d in iter_documents([warc])}


def tessera_resiliparse(warc: Path, out: Path, dedup: str = "minhash") -> dict[str, str]:
    return tessera(warc, out, dedup, extractor="resiliparse")


def datatrove(warc: Path, out: Path) -> dict[str, str]:
    """url → text of the documents datatrove's filters keep (in the order its signature step saw them);
    its MinHash signatures are written under ``out/signatures``."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import WarcReader

    kept: dict[str, str] = {}

    def record(data: Iterator[Any], rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        for doc in data:
            kept[doc.metadata["url"]] = doc.text
            yield doc

    steps: list[Callable[..., Any]] = [
        WarcReader(str(warc.parent), glob_pattern=warc.name), Trafilatura(deduplicate=False, timeout=TIMEOUT_S),
        GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(), record, MinhashDedupSignature(str(out / "signatures"), config=MinhashConfig()),
    ]
    data = None
    for step in steps:  # as datatrove's LocalPipelineExecutor runs one task
        data = step(data, 0, 1)
    if data is not None:
        for _ in data:
            pass
    return kept


def datatrove_near_duplicates(out: Path, order: list[str]) -> set[str]:
    """The urls datatrove's MinHash stages 2 and 3 remove, from the signatures :func:`datatrove` wrote."""
    import struct

    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster

    config = MinhashConfig()
    buckets = MinhashDedupBuckets(str(out / "signatures"), str(out / "buckets"), config=config)
    for rank in range(config.num_buckets):
        buckets.run(None, rank, config.num_buckets)
    MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=config).run(None, 0, 1)
    removed = out / "remove" / "000000.remove"
    data = removed.read_bytes() if removed.is_file() else b""
    return {order[i] for (i,) in struct.iter_unpack("<I", data)}


def agreement(urls: list[str], ours: set[str], theirs: set[str]) -> dict[str, Any]:
    both = sum((u in ours) == (u in theirs) for u in urls)
    return {"pages": len(urls), "agreement": both / len(urls), "kept_ours": len(ours), "kept_datatrove": len(theirs),
            "only_ours": sorted(ours - theirs)[:10], "only_datatrove": sorted(theirs - ours)[:10]}


def profile(warc: Path, tmp: Path, top: int) -> list[str]:
    """Tessera's prep under cProfile: the functions with the most own time."""
    profiler = cProfile.Profile()
    profiler.runcall(tessera, warc, tmp / "profile")
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    return [line for line in stream.getvalue().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (the sides alternate)")
    parser.add_argument("--max-per-source", type=int, default=None, help="at most N articles of each corpus")
    parser.add_argument("--profile", action="store_true", help="also profile Tessera's side (cProfile)")
    parser.add_argument("--smoke", action="store_true", help="a few pages, one repetition (CI)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.reps, args.max_per_source = 1, 4
    pages = build_pages(args.max_per_source)
    megabytes = sum(len(p.html.encode()) for p in pages) / 1e6
    urls = [p.url for p in pages]
    print(f"{len(pages)} pages, {megabytes:.2f} MB of HTML")
    sides: dict[str, Callable[[Path, Path], dict[str, str]]] = {
        "tessera prep": tessera, "datatrove 0.10": datatrove,
        "tessera prep --extractor resiliparse": tessera_resiliparse,
        "WARC reading + trafilatura alone (the ceiling)": extraction_only}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    wall: dict[str, list[float]] = {name: [] for name in sides}
    kept: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        warc = tmp / "pages.warc.gz"
        write_warc(pages, warc)
        write_warc(pages[:5], tmp / "warm-up.warc.gz")
        names = list(sides)
        with contextlib.redirect_stderr(io.StringIO()):  # imports, spaCy, trafilatura's first call: not timed
            for name, side in sides.items() if not args.smoke else ():
                side(tmp / "warm-up.warc.gz", tmp / f"warm-up-{names.index(name)}")
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                out = tmp / f"{name.split()[0]}-{names.index(name)}-{rep}"
                with contextlib.redirect_stderr(io.StringIO()):  # datatrove logs every step
                    start_cpu, start = cpu_now(), time.perf_counter()
                    kept[name] = sides[name](warc, out)
                    cpu[name].append(cpu_now() - start_cpu)
                    wall[name].append(time.perf_counter() - start)
        with contextlib.redirect_stderr(io.StringIO()):
            filtered = tessera(warc, tmp / "filters-only", dedup="none")
            filtered_resiliparse = tessera_resiliparse(warc, tmp / "filters-only-resiliparse", dedup="none")
            last = tmp / f"datatrove-{names.index('datatrove 0.10')}-{args.reps - 1}"
            removed = datatrove_near_duplicates(last, list(kept["datatrove 0.10"]))
        lines = profile(warc, tmp, 25) if args.profile else []
    theirs_filtered = set(kept["datatrove 0.10"])
    theirs_final = theirs_filtered - removed
    same_text = [u for u in set(kept["tessera prep"]) & theirs_final
                 if kept["tessera prep"][u].split() == kept["datatrove 0.10"][u].split()]
    both_final = set(kept["tessera prep"]) & theirs_final
    results: dict[str, Any] = {"pages": len(pages), "megabytes": megabytes, "reps": args.reps,
                               "load": os.getloadavg(), "speed": {}, "profile": lines}
    base = statistics.median(cpu["datatrove 0.10"])
    for name in sides:
        results["speed"][name] = {"cpu_s": cpu[name], "wall_s": wall[name],
                                  "mb_per_core_s": megabytes / statistics.median(cpu[name]),
                                  "mb_per_wall_s": megabytes / statistics.median(wall[name]),
                                  "x_datatrove": base / statistics.median(cpu[name])}
    results["agreement"] = {
        "filters": agreement(urls, set(filtered), theirs_filtered),
        "after near dedup": agreement(urls, set(kept["tessera prep"]), theirs_final),
        "filters, --extractor resiliparse": agreement(urls, set(filtered_resiliparse), theirs_filtered),
        "near duplicates removed": {"tessera": len(filtered) - len(kept["tessera prep"]), "datatrove": len(removed)},
        "same kept words": len(same_text) / len(both_final) if both_final else None,
    }
    print(f"\n{'side':48} {'MB/s/core':>9} {'MB/s wall':>9} {'× datatrove':>11}")
    for name, r in results["speed"].items():
        print(f"{name:48} {r['mb_per_core_s']:9.2f} {r['mb_per_wall_s']:9.2f} {r['x_datatrove']:11.2f}")
    for name, r in results["agreement"].items():
        print(f"{name}: {r}")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
