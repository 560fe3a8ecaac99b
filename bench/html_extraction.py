"""HTML → main text: trafilatura vs resiliparse on the same pages, speed and quality (a benchmark, not a test).

The pages are built from the shipped articles wrapped in varied boilerplate (:mod:`bench.web_pages`), so the
truth is known: quality is word-level precision, recall and F1 against the article (mean over pages, and
pooled over all words), and the share of boilerplate pieces that leaked into the text. Speed is MB of HTML
per CPU-second of this one process (= per core), every extractor timed over all pages in each repetition,
the extractors taking turns (order rotated), the median kept: the machine is shared and noisy, ratios
measured side by side are what to read. trafilatura's own CLI (``--parallel 1``, the same settings as
Tessera's call) runs on the same pages written as files, also once per repetition; its CPU time is its
processes' (startup included; the startup alone is measured on an empty directory). Run from the repository
root::

    PYTHONPATH=. python bench/html_extraction.py [--reps 5] [--json PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.web_pages import Page, build_pages, score

Extractor = Callable[[str, str], str]
TESSERA = "trafilatura, Tessera (FineWeb settings)"


def extractors() -> dict[str, Extractor]:
    """Name → extract(html, url): Tessera's call, trafilatura's defaults (Tessera's call before this bench),
    trafilatura's fast mode (no fallback extractors), resiliparse's main-content extraction."""
    import trafilatura

    from data.readers import extract_main_text

    return {
        TESSERA: lambda page, url: extract_main_text(page, url) or "",
        "trafilatura, defaults (comments kept)": lambda page, url: trafilatura.extract(page, url=url) or "",
        "trafilatura, FineWeb settings + fast": lambda page, url: trafilatura.extract(
            page, url=url, favor_precision=True, include_comments=False, fast=True) or "",
        "resiliparse, main content": lambda page, url: extract_main_text(page, url, "resiliparse") or "",
    }


def quality(pages: list[Page], extract: Extractor) -> dict[str, Any]:
    """Scores of one extractor over every page, and per layout F1."""
    scores = [score(page, extract(page.html, page.url)) for page in pages]
    leaks: Counter[str] = Counter()
    for s in scores:
        leaks.update({k.removeprefix("leaked_"): v for k, v in s.items() if k.startswith("leaked_")})
    by_layout: dict[str, list[float]] = {}
    for page, s in zip(pages, scores):
        by_layout.setdefault(page.layout, []).append(s["f1"])
    return {
        "precision": statistics.mean(s["precision"] for s in scores),
        "recall": statistics.mean(s["recall"] for s in scores),
        "f1": statistics.mean(s["f1"] for s in scores),
        "leak_rate": sum(s["leaked"] for s in scores) / sum(s["pieces"] for s in scores),
        "pages_with_leak": sum(s["leaked"] > 0 for s in scores) / len(scores),
        "pages_lost": sum(s["recall"] < 0.5 for s in scores),
        "leaks_by_kind": dict(leaks.most_common()),
        "f1_by_layout": {k: statistics.mean(v) for k, v in sorted(by_layout.items())},
    }


def cpu_seconds(run: Callable[[], None]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def cli_seconds(folder: Path, out: Path) -> float:
    """CPU seconds (user + system, all its processes) of trafilatura's CLI over ``folder``."""
    exe = Path(sys.executable).with_name("trafilatura")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([str(exe), "--input-dir", str(folder), "--output-dir", str(out), "--parallel", "1",
                    "--precision", "--no-comments"], check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'extractor':42} {'MB/s/core':>9} {'× Tessera':>9} {'P':>6} {'R':>6} {'F1':>6} {'leak':>6} "
          f"{'pages leak':>10} {'lost':>4}")
    for name, r in results.items():
        if "f1" in r:
            q = " ".join(f"{r[k]:6.3f}" for k in ("precision", "recall", "f1", "leak_rate"))
            q += f" {r['pages_with_leak']:10.3f} {r['pages_lost']:4d}"
        else:
            q = f"(Tessera's texts it gives too: {r['same_text_as_tessera']:.1%})"
        print(f"{name:42} {r['mb_per_core_s']:9.2f} {r['speed_vs_tessera']:9.2f} {q}")
    cli = results["trafilatura CLI"]
    print(f"trafilatura CLI startup {cli['cli_startup_cpu_s']:.2f} CPU s; without it "
          f"{cli['mb_per_core_s_without_startup']:.2f} MB/s")
    for name, r in results.items():
        if "f1" in r:
            print(f"  {name}: leaks {r['leaks_by_kind']}; F1 by layout "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["f1_by_layout"].items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (each extractor in turn)")
    parser.add_argument("--max-per-source", type=int, default=None, help="at most N articles of each corpus")
    parser.add_argument("--smoke", action="store_true", help="a few pages, one repetition (CI)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.reps, args.max_per_source = 1, 3
    pages = build_pages(args.max_per_source)
    megabytes = sum(len(p.html.encode()) for p in pages) / 1e6
    print(f"{len(pages)} pages, {megabytes:.2f} MB of HTML, article words {sum(len(p.article.split()) for p in pages)}")
    chosen = extractors()
    results: dict[str, dict[str, Any]] = {name: quality(pages, f) for name, f in chosen.items()}
    timings: dict[str, list[float]] = {name: [] for name in [*chosen, "trafilatura CLI"]}
    with tempfile.TemporaryDirectory() as tmp:
        folder, empty = Path(tmp, "pages"), Path(tmp, "empty")
        folder.mkdir()
        empty.mkdir()
        for i, page in enumerate(pages):
            Path(folder, f"{i:05d}.html").write_text(page.html, encoding="utf-8")
        names = list(timings)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                if name == "trafilatura CLI":
                    timings[name].append(cli_seconds(folder, Path(tmp, f"out{rep}")))
                else:
                    f = chosen[name]
                    timings[name].append(cpu_seconds(lambda f=f: [f(p.html, p.url) for p in pages]))
        startup = cli_seconds(empty, Path(tmp, "out-empty"))
        cli_texts = {t.read_text().strip() for t in Path(tmp, "out0").rglob("*.txt")}  # named by a hash of the text
        ours = {chosen[TESSERA](p.html, p.url).strip() for p in pages} - {""}
        same = len(ours & cli_texts) / len(ours)
        results["trafilatura CLI"] = {"cli_startup_cpu_s": startup, "same_text_as_tessera": same}
    base = statistics.median(timings[TESSERA])
    for name, seconds in timings.items():
        median = statistics.median(seconds)
        results[name].update({"cpu_s": seconds, "mb_per_core_s": megabytes / median, "speed_vs_tessera": base / median})
    cli = results["trafilatura CLI"]
    cli_seconds_median = statistics.median(timings["trafilatura CLI"])
    cli["mb_per_core_s_without_startup"] = megabytes / max(cli_seconds_median - startup, 1e-9)
    print_table(results)
    report = {"pages": len(pages), "megabytes": megabytes, "reps": args.reps, "load": os.getloadavg(),
              "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
