"""Shards on disk (issue 19, not a test): bytes per token of ``tessera shard``'s output for the shipped
corpora, and the loader's CPU time per batch on them, this tree against a checkout of the code before.

Every corpus of examples/data is sharded with its kind as ``tessera shard`` does (text with
``--append-eos``; one byte-level BPE tokenizer of 8,192 ids, so uint16 tokens), plus the loader
benchmark's English corpus (bench/data_throughput.py: the five English files as blocks, once; its
default repeats them to 28 MB) and TinyStories' tokens cut into 40-token documents. *B/token* is every
file of the shard directory (tars, index files, manifest) over the manifest's token count (masks,
labels and bytes are not tokens). With ``--base DIR`` each tree writes its own shards of the same
documents (a subprocess with ``PYTHONPATH=DIR``), and the in-process loader (``num_workers=0``, batch 8)
is timed on each tree's own shards: CPU ms per batch over 200 batches, the trees alternating, median
of 5 (CPU time: wall clocks are unusable on a shared, loaded machine); and the two trees' first 200
batches are compared (sha256 of their tensors): the same documents in the same order give the same.

    PYTHONPATH=. python bench/shard_bytes.py [--base DIR] [--repeats 5] [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.loader_index import BATCH_PROBE

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
ENGLISH = ["pretrain_tinyshakespeare.txt", "pretrain_war_and_peace_books_1_4.txt",
           "pretrain_tinystories_valid_head.txt", "pretrain_wikipedia_demo.txt", "pretrain_c4_demo.jsonl"]
CORPORA = {  # name: (files, kind, make_shards options)
    **{name.removeprefix("pretrain_").split(".")[0]: ([name], "text", {"append_eos": True}) for name in ENGLISH},
    "english (data_throughput)": (ENGLISH, "text", {"append_eos": True, "txt_mode": "block"}),
    "sft_alpaca": (["sft_alpaca_en_demo.json"], "sft", {}),
    "sft_rasbt": (["sft_rasbt_instruction_data.json"], "sft", {}),
    "pref_llamafactory": (["pref_llamafactory_dpo_en_demo.json"], "preference", {}),
    "pref_rasbt": (["pref_rasbt_instruction_data_with_preference.json"], "preference", {}),
    "cls_sms_spam": (["cls_sms_spam_collection.tsv"], "classification", {}),
    "seq2seq_scan": (["seq2seq_scan_simple_train_quarter.txt"], "seq2seq", {}),
}
SHORT_DOCS = "tinystories, 40-token documents"
BATCH_CASES = (("clm", 2048, "tinystories_valid_head"), ("clm", 128, SHORT_DOCS), ("sft", 512, "sft_alpaca"))
SMOKE_CORPORA = ("tinystories_valid_head", "sft_rasbt")  # --smoke: these, one timing each
SMOKE_CASES = (("clm", 128, SHORT_DOCS), ("sft", 512, "sft_rasbt"))

SHARD = r"""
import json, sys
from pathlib import Path

from bench.loader_index import BATCH_PROBE
import numpy as np
from data.make_shards import make_shards
from data.shards import ShardManifest, ShardWriter
from data.tokenizer import load_tokenizer
from data.shard_set import ShardSet, Source
data, tok_dir, out, corpora = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
for name, (files, kind, options) in corpora.items():
    make_shards([str(data / f) for f in files], tok_dir, out / name, kind=kind, num_workers=1, **options)
tok = load_tokenizer(tok_dir)
stories = ShardSet([Source(str(out / "tinystories_valid_head"))])
flat = np.concatenate([stories.read(i) for i in range(stories.num_samples)])
writer = ShardWriter(out / sys.argv[5], kind="text", vocab_size=tok.vocab_size, tokenizer_sha256=tok.sha256)
for at in range(0, len(flat) - 40, 40):
    writer.write({"tokens": flat[at : at + 40]})
writer.close()
"""



def run(tree: Path, script: str, *argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode:
        sys.exit(f"{tree}: {done.stderr.strip().splitlines()[-1]}")
    return done.stdout


def on_disk(root: Path) -> dict:
    manifest = json.loads((root / "manifest.json").read_text())
    files = sum(p.stat().st_size for p in root.iterdir())
    tars = sum(s["bytes"] for s in manifest["shards"])
    tokens = manifest["num_tokens"]
    return {"version": manifest["version"], "samples": manifest["num_samples"], "tokens": tokens,
            "shards": len(manifest["shards"]), "bytes": files, "tar_bytes": tars,
            "bytes_per_token": round(files / tokens, 2),
            "tokens_per_sample": round(tokens / manifest["num_samples"], 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=None, help="a checkout of the code before (e.g. main)")
    parser.add_argument("--repeats", type=int, default=5, help="loader timings per tree and case (median)")
    parser.add_argument("--smoke", action="store_true", help=f"only {', '.join(SMOKE_CORPORA)}, one timing each")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "shard_bytes.json")
    args = parser.parse_args(argv)
    corpora = {name: CORPORA[name] for name in SMOKE_CORPORA} if args.smoke else CORPORA
    cases, repeats = (SMOKE_CASES, 1) if args.smoke else (BATCH_CASES, args.repeats)
    trees = [("after", ROOT)] + ([("before", args.base.resolve())] if args.base else [])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = work / "tokenizer"
        run(ROOT, "import sys\nfrom data.readers import iter_documents\nfrom data.tokenizer import train_tokenizer\n"
            "train_tokenizer([d.text for d in iter_documents(sys.argv[1:-1], txt_mode='block')], sys.argv[-1], "
            "vocab_size=8192)", *[str(DATA / f) for f in ENGLISH], str(tok))
        sizes: dict[str, dict] = {}
        for code, tree in trees:
            run(tree, SHARD, str(DATA), str(tok), str(work / code), json.dumps(corpora), SHORT_DOCS)
            sizes[code] = {name: on_disk(work / code / name) for name in [*corpora, SHORT_DOCS]}
        times: dict[str, dict[str, list[float]]] = {code: {} for code, _ in trees}
        batches: dict[str, dict[str, set[str]]] = {code: {} for code, _ in trees}
        for _ in range(repeats):
            for code, tree in trees:
                for objective, seq_len, corpus in cases:
                    ms, digest = json.loads(run(tree, BATCH_PROBE, str(work / code / corpus), str(tok), objective,
                                                str(seq_len)))
                    case = f"{objective} seq {seq_len} on {corpus}"
                    times[code].setdefault(case, []).append(ms)
                    batches[code].setdefault(case, set()).add(digest)
    cpu_ms = {code: {case: round(sorted(t)[len(t) // 2], 3) for case, t in cases.items()}
              for code, cases in times.items()}
    same = {case: len({d for code in batches for d in batches[code][case]}) == 1
            for case in cpu_ms["after"]} if args.base else {}
    print_table(sizes, cpu_ms, same)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"sizes": sizes, "cpu_ms_per_batch": cpu_ms, "times": times,
                                     "same_batches": same}, indent=1) + "\n")
    print(f"\n→ {args.json}")
    return 0


def print_table(sizes: dict[str, dict], cpu_ms: dict[str, dict], same: dict[str, bool]) -> None:
    codes = list(sizes)
    print("| corpus | kind | samples | tokens/sample | " + " | ".join(
        f"{c} v{next(iter(sizes[c].values()))['version']} shards | MB | B/token" for c in codes) + " |")
    print("|---|---|---:|---:|" + "---:|---:|---:|" * len(codes))
    kinds = {name: kind for name, (_, kind, _) in CORPORA.items()} | {SHORT_DOCS: "text"}
    for name, row in sizes[codes[0]].items():
        cells = " | ".join(f"{sizes[c][name]['shards']} | {sizes[c][name]['bytes'] / 1e6:.2f} | "
                           f"{sizes[c][name]['bytes_per_token']:.2f}" for c in codes)
        print(f"| {name} | {kinds[name]} | {row['samples']} | {row['tokens_per_sample']} | {cells} |")
    print("\n| loader case (CPU ms per batch of 8, median) | " + " | ".join(codes) + " | the same 200 batches |")
    print("|---|" + "---:|" * len(codes) + "---|")
    for case in cpu_ms[codes[0]]:
        print(f"| {case} | " + " | ".join(f"{cpu_ms[c][case]:.3f}" for c in codes) + f" | {same.get(case, '-')} |")


if __name__ == "__main__":
    sys.exit(main())
