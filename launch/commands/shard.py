"""`tessera shard INPUT... --tokenizer DIR --out DIR [--executor local|ray|slurm --tasks N]`: tokenize into
webdataset shards + manifest.json, in this process or as N tasks on a cluster engine
(:mod:`launch.shard_executors`: the same shards).

`tessera shard verify DIR...`: check every shard in full (exit 0; 2 with one line per damaged shard)."""

from __future__ import annotations

import argparse
import os
from collections import Counter

from common.errors import UserError
from data.readers import TXT_MODE_HELP, TXT_MODES
from data.shards import KINDS
from launch.executors import add_executor_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="text: .txt/.jsonl/.json (e.g. prep's documents.jsonl); sft/preference/unpaired/"
                             "prompt: .jsonl/.json; classification: label<TAB>text lines; "
                             "seq2seq: 'IN: ... OUT: ...' lines; or `verify DIR...`: check shard directories")
    parser.add_argument("--tokenizer", help="a tokenizer directory (tessera tokenizer train, a model "
                        "directory) or a Hugging Face Hub id (its tokenizer.json, from the HF cache)")
    parser.add_argument("--out", help="an empty output directory")
    parser.add_argument("--kind", choices=list(KINDS), default="text")
    parser.add_argument("--shard-size", default="64MB", help="target bytes per shard (e.g. 64MB, 512KB)")
    parser.add_argument("--append-eos", action="store_true", help="text: end every document with EOS")
    parser.add_argument("--add-bos", action="store_true", help="text: start every document with BOS")
    parser.add_argument("--text-field", default="text", help="text: the field of .jsonl/.json records")
    parser.add_argument("--txt-mode", choices=TXT_MODES, default="auto", help=TXT_MODE_HELP)
    parser.add_argument("--max-len", type=int, default=None, help="all but text: cut records to this many tokens")
    parser.add_argument("--labels", type=lambda s: s.split(","), default=None, metavar="A,B,...",
                        help="classification: the label names in index order (default: sorted)")
    parser.add_argument("--skip-bad", action="store_true", help="conversations: skip (and count) bad records")
    parser.add_argument("--metadata", action="store_true",
                        help="store each sample's source id (its pack's {key}.json: a list, an object per sample)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="tokenizing processes (with --executor local: tasks side by side)")
    add_executor_flags(
        parser,
        executor_help="tokenize as --tasks tasks (whole files each): local processes, Ray tasks (the cluster "
                      "at RAY_ADDRESS, else a local one) or a SLURM job array, then merge into the shards "
                      "one process writes; a rerun runs only the unfinished tasks (default: no tasks)",
        tasks_help="how many tasks the input files are dealt to (default 1)",
        no_wait_help="slurm: submit the task array and the merge job after it, print their ids and return",
    )


def run(args: argparse.Namespace) -> int:
    from common.hub import local_or_hub
    from data.make_shards import make_shards, parse_size
    from launch.executors import check_slurm_flags

    if args.inputs[0] == "verify" and args.tokenizer is None:
        return verify(args.inputs[1:])
    if args.tokenizer is None or args.out is None:
        raise UserError("tessera shard needs --tokenizer and --out (or: tessera shard verify DIR)")

    check_slurm_flags(args, args.executor)
    settings = dict(kind=args.kind, shard_bytes=parse_size(args.shard_size), append_eos=args.append_eos,
                    add_bos=args.add_bos, text_field=args.text_field, txt_mode=args.txt_mode, max_len=args.max_len,
                    skip_bad=args.skip_bad, metadata=args.metadata, labels=args.labels)
    if args.executor is None and args.tasks is None:
        manifest, skipped = make_shards(args.inputs, local_or_hub(args.tokenizer), args.out,
                                        num_workers=args.workers, **settings)
    else:
        from launch.executors import SlurmOptions
        from launch.shard_executors import shard_with_tasks

        slurm = SlurmOptions(partition=args.partition, account=args.account, qos=args.qos, time=args.time,
                             mem=args.mem, wait=not args.no_wait)
        tasks = 1 if args.tasks is None else args.tasks
        merged, ran = shard_with_tasks(args.inputs, local_or_hub(args.tokenizer), args.out,
                                       executor=args.executor or "local", tasks=tasks, workers=args.workers,
                                       slurm=slurm, **settings)
        if merged is None:
            return 0
        print(f"{tasks} tasks on {args.executor or 'local'}: {len(ran)} ran, {tasks - len(ran)} were done")
        manifest, skipped = merged, Counter(merged.extra.get("skipped", {}))
    print(f"{manifest.num_samples} {args.kind} samples, {manifest.num_tokens} tokens in "
          f"{len(manifest.shards)} shards → {args.out}/manifest.json")
    for reason, count in skipped.items():
        print(f"  skipped {count:6d}  {reason}")
    for path, count in manifest.extra.get("invalid_utf8_bytes", {}).items():
        print(f"  replaced {count:5d}  bytes that are not UTF-8 in {path} (with U+FFFD)")
    return 0


def verify(directories: list[str]) -> int:
    """Every shard of every directory checked in full; one line per damaged shard."""
    from data.shards import ShardError, ShardManifest, verify_shard

    if not directories:
        raise UserError("tessera shard verify needs a shard directory")
    damaged = 0
    for directory in directories:
        manifest = ShardManifest.load(directory)
        for info in manifest.shards:
            try:
                verify_shard(manifest, info)
            except ShardError as exc:
                damaged += 1
                print(exc)
        note = "" if manifest.version > 1 else " (format 1: no index files; re-shard for a fast start)"
        print(f"{directory}: {len(manifest.shards)} shards, {manifest.num_samples} samples checked{note}")
    if damaged:
        print(f"{damaged} damaged shard(s)")
        return 2
    return 0
