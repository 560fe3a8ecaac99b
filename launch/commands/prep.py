"""`tessera prep INPUT... --out DIR [--executor local|ray|slurm --tasks N]`: clean, filter and deduplicate
raw text, in this process or as N tasks on a cluster engine (:mod:`launch.prep_executors`)."""

from __future__ import annotations

import argparse

from data.readers import EXTRACTOR_HELP, EXTRACTORS, TXT_MODE_HELP, TXT_MODES
from launch.executors import add_executor_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=".txt/.jsonl/.json files (or .gz/.zst), .parquet, .warc(.gz), or directories")
    parser.add_argument("--out", required=True, help="output directory: documents.jsonl and report.json")
    parser.add_argument("--text-field", default="text",
                        help="the text field of .jsonl/.json records or .parquet column (default text)")
    parser.add_argument("--txt-mode", choices=TXT_MODES, default="auto", help=TXT_MODE_HELP)
    parser.add_argument("--extractor", choices=list(EXTRACTORS), default="trafilatura", help=EXTRACTOR_HELP)
    parser.add_argument("--filters", default="gopher,c4,fineweb",
                        help="comma list of gopher, gopher_quality, gopher_repetition, c4, fineweb; or none")
    parser.add_argument("--dedup", default="exact,minhash", help="comma list of exact, minhash; or none")
    parser.add_argument("--unicode", default="NFC", choices=["NFC", "NFKC", "none"], help="Unicode normal form")
    parser.add_argument("--pii", action="store_true",
                        help="replace emails and public IPv4 addresses in the kept documents (as datatrove does)")
    parser.add_argument("--languages", help="keep only these languages (comma list of ISO 639-1 codes, e.g. en,fr), "
                                           "identified by py3langid's model (it ships in the package)")
    parser.add_argument("--language-threshold", type=float, default=0.65,
                        help="minimum language probability to keep a document (default 0.65, as datatrove)")
    parser.add_argument("--decontaminate", nargs="+", metavar="EVAL_FILE",
                        help="remove documents sharing an n-gram with these evaluation files' items (.jsonl/.json "
                             "records with question/answer or choices+label fields, or .txt lines)")
    parser.add_argument("--decontaminate-ngram", type=int, default=12, help="n-gram length (default 12, as datatrove)")
    parser.add_argument("--url-blocklist", help="a file of blocked domains / URL prefixes, one a line, checked against "
                                                "each document's url field (WARC pages have one)")
    parser.add_argument("--minhash-bands", type=int, default=14)
    parser.add_argument("--minhash-rows", type=int, default=8)
    parser.add_argument("--minhash-ngram", type=int, default=5, help="words per shingle")
    add_executor_flags(
        parser,
        executor_help="run as --tasks tasks: local processes, Ray tasks (the cluster at RAY_ADDRESS, else a "
                      "local one), or SLURM job arrays; a rerun runs only the unfinished tasks "
                      "(default: one process, no tasks)",
        tasks_help="how many tasks the inputs are dealt to (default 1)",
        no_wait_help="slurm: submit the task, band and merge jobs (each after the one before), print "
                     "their ids and return",
    )


def run(args: argparse.Namespace) -> int:
    options = dict(
        text_field=args.text_field, txt_mode=args.txt_mode, extractor=args.extractor, filters=args.filters,
        dedup=args.dedup, unicode_form="" if args.unicode == "none" else args.unicode,
        minhash_bands=args.minhash_bands, minhash_rows=args.minhash_rows, minhash_ngram=args.minhash_ngram,
        pii=args.pii, languages=args.languages.split(",") if args.languages else None,
        language_threshold=args.language_threshold, decontaminate=args.decontaminate,
        decontaminate_ngram=args.decontaminate_ngram, url_blocklist=args.url_blocklist,
    )
    from launch.executors import check_slurm_flags

    check_slurm_flags(args, args.executor)
    if args.executor is None and args.tasks is None:
        from data.prepare import prepare

        report = prepare(args.inputs, args.out, **options)
    else:
        from launch.executors import SlurmOptions
        from launch.prep_executors import prep_with_tasks

        slurm = SlurmOptions(partition=args.partition, account=args.account, qos=args.qos, time=args.time,
                             mem=args.mem, wait=not args.no_wait)
        report = prep_with_tasks(args.inputs, args.out, executor=args.executor or "local",
                                 tasks=1 if args.tasks is None else args.tasks,
                                 slurm=slurm, **options)
        if report is None:
            return 0
    print(f"kept {report['documents_out']} of {report['documents_in']} documents "
          f"({report['bytes_in'] / 1e6:.2f} MB in {report['seconds']:.1f} s, {report['mb_per_s']} MB/s) → {args.out}")
    if "executor" in report:
        tasks = report["executor"]
        print(f"  {tasks['tasks']} tasks on {tasks['name']}: {len(tasks['ran'])} ran, {tasks['reused']} were done")
    if report["extractor"]:
        print(f"  WARC pages' main text by {report['extractor']}")
    for path, mode in report["txt_modes"].items():
        print(f"  {path}: one document per {mode}")
    for reason, count in report["skipped"].items():
        print(f"  skipped {count:7d}  {reason}")
    for path, count in report["invalid_utf8_bytes"].items():
        print(f"  replaced {count:6d}  bytes that are not UTF-8 in {path} (with U+FFFD)")
    for rule, count in report["removed"].items():
        print(f"  removed {count:7d}  {rule}")
    return 0
