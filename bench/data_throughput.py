"""Data throughput benchmark (not a test): loader tokens/s and preparation MB/s, side by side.

Loader, on the same real-corpus shards, 2 DataLoader workers each, packed CLM rows of ``--seq-len``:
  * tessera: ``data.loader.build_loader`` (memory-mapped tar members, exact resume);
  * webdataset: the stock pipeline decoding the same tars, packing rows in a generator;
  * webdataset-raw: the same, reading the .npy bytes without webdataset's decoder;
  * memmap: one flat uint16 array, rows sliced from a numpy memmap (the speed ceiling).
Preparation, 1 process: the Gopher quality + repetition, C4 and FineWeb filters, and MinHash LSH
(5-grams, 14 bands × 8 rows); datatrove is compared when importable (it is not installed here: the
reference figures the issue measured on this machine class are printed, labelled as such), and our
near-dedup decisions are compared with datasketch's MinHashLSH on the same documents.

    PYTHONPATH=. python bench/data_throughput.py [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ENGLISH = ["pretrain_tinyshakespeare.txt", "pretrain_war_and_peace.txt", "pretrain_tinystories_valid_head.txt",
           "pretrain_wikipedia_demo.txt", "pretrain_c4_demo.jsonl"]
DATATROVE_REFERENCE = {"filters_mb_per_s": 0.067, "minhash_mb_per_s": 0.24}  # issue 3, 1 worker, this machine class


def corpus_files() -> list[Path]:
    for folder in (SHARED, ROOT / "examples" / "data"):
        found = [folder / name for name in ENGLISH if (folder / name).is_file()]
        if found:
            return found
    sys.exit("no corpus found in ../shared/data or examples/data")


def build_shards(work: Path, target_mb: float, shards: int) -> tuple[Path, Path, int]:
    """A tokenizer and ``shards`` tar shards of the English corpus repeated to ``target_mb``."""
    from data.make_shards import make_shards
    from data.readers import iter_documents
    from data.tokenizer import train_tokenizer

    files = corpus_files()
    texts = [d.text for d in iter_documents(files, txt_mode="block")]
    size = sum(len(t.encode()) for t in texts)
    repeats = max(1, round(target_mb * 1e6 / size))
    train_tokenizer(texts, work / "tok", vocab_size=8192)
    corpus = work / "corpus.jsonl"
    with corpus.open("w") as f:
        for _, text in itertools.product(range(repeats), texts):
            f.write(json.dumps({"text": text}) + "\n")
    tar_bytes = corpus.stat().st_size // 2  # ~2 bytes a token of ~4 characters, documents packed
    manifest, _ = make_shards([str(corpus)], work / "tok", work / "shards", append_eos=True,
                              shard_bytes=tar_bytes // shards, num_workers=os.cpu_count() or 1)
    return work / "tok", work / "shards", manifest.num_tokens


def timed(batches: Iterator[torch.Tensor], count: int, warmup: int) -> float:
    """Tokens per second over ``count`` batches after ``warmup`` (including worker start-up in warm-up)."""
    for _ in range(warmup):
        next(batches)
    start, tokens = time.perf_counter(), 0
    for _ in range(count):
        tokens += next(batches).numel()
    return tokens / (time.perf_counter() - start)


def ours(shard_dir: Path, tok_dir: Path, seq_len: int, batch: int, workers: int) -> Iterator[torch.Tensor]:
    from data.config import DataConfig
    from data.loader import build_loader
    from data.tokenizer import load_tokenizer

    cfg = DataConfig.from_dict({"train": str(shard_dir), "seq_len": seq_len, "num_workers": workers})
    loader = build_loader(cfg, objective="clm", tokenizer=load_tokenizer(tok_dir), rank=0, world_size=1,
                          micro_batch_size=batch, seed=0)
    return (b["input_ids"] for b in loader)


class _Packed(torch.utils.data.IterableDataset):
    """Rows of ``seq_len + 1`` tokens packed from any iterable of token arrays, batched."""

    def __init__(self, make_samples, seq_len: int, batch: int) -> None:
        self.make_samples, self.seq_len, self.batch = make_samples, seq_len, batch

    def __iter__(self):
        n = self.seq_len + 1
        buffer: list[np.ndarray] = []
        held = 0
        rows = []
        for tokens in self.make_samples():
            buffer.append(tokens)
            held += len(tokens)
            while held >= n:
                flat = np.concatenate(buffer)
                rows.append(flat[:n])
                buffer, held = [flat[self.seq_len :]], len(flat) - self.seq_len
                if len(rows) == self.batch:
                    yield torch.from_numpy(np.stack(rows).astype(np.int64))
                    rows = []


def webdataset_rows(shard_dir: Path, seq_len: int, batch: int, workers: int, raw: bool) -> Iterator[torch.Tensor]:
    import webdataset as wds

    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))

    def samples():
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                            workersplitter=wds.split_by_worker, empty_check=False)
        if raw:
            for s in ds:
                data = s["tokens.npy"]
                yield np.frombuffer(data, np.uint16, offset=10 + int.from_bytes(data[8:10], "little"))
        else:
            for (tokens,) in ds.decode().to_tuple("tokens.npy"):
                yield tokens

    def forever():
        while True:
            yield from samples()

    loader = torch.utils.data.DataLoader(_Packed(forever, seq_len, batch), batch_size=None, num_workers=workers)
    return iter(loader)


def memmap_rows(shard_dir: Path, work: Path, seq_len: int, batch: int, workers: int) -> Iterator[torch.Tensor]:
    from data.shard_set import ShardSet, Source

    shards = ShardSet([Source(str(shard_dir))])
    flat = np.concatenate([shards.read(i) for i in range(shards.num_samples)])
    path = work / "flat.npy"
    np.save(path, flat)
    rows = (len(flat) - 1) // seq_len

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            data = np.load(path, mmap_mode="r")
            info = torch.utils.data.get_worker_info()
            worker = info.id if info else 0
            rng = np.random.default_rng(worker)
            while True:
                starts = rng.integers(0, rows, batch) * seq_len
                yield torch.from_numpy(np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int64))

    return iter(torch.utils.data.DataLoader(Rows(), batch_size=None, num_workers=workers))


def loader_bench(args: argparse.Namespace, work: Path) -> dict:
    tok, shard_dir, tokens = build_shards(work, args.corpus_mb, args.shards)
    seq, batch, workers = args.seq_len, args.batch, args.workers
    count, warmup = (30, 5) if args.smoke else (400, 20)
    results = {"corpus_tokens": tokens, "shards": len(list(shard_dir.glob("*.tar"))), "seq_len": seq,
               "micro_batch": batch, "workers": workers, "tokens_per_s": {}}
    runs = {
        "tessera": lambda: ours(shard_dir, tok, seq, batch, workers),
        "tessera (0 workers)": lambda: ours(shard_dir, tok, seq, batch, 0),
        "memmap flat array": lambda: memmap_rows(shard_dir, work, seq, batch, workers),
    }
    if importlib.util.find_spec("webdataset"):
        runs["webdataset (decode)"] = lambda: webdataset_rows(shard_dir, seq, batch, workers, raw=False)
        runs["webdataset (raw bytes)"] = lambda: webdataset_rows(shard_dir, seq, batch, workers, raw=True)
    else:
        results["note"] = "webdataset is not installed: stock webdataset not measured"
    for name, make in runs.items():
        results["tokens_per_s"][name] = timed(make(), count, warmup)
    return results


def prep_bench(args: argparse.Namespace, work: Path) -> dict:
    from data.filters import build
    from data.prepare import prepare
    from data.readers import iter_documents

    files = [f for f in corpus_files() if "wikipedia" not in f.name]  # one huge block; the rest are documents
    if args.smoke:
        files = [f for f in files if "c4" in f.name or "tinystories" in f.name]
    filters = prepare(files, work / "prep_filters", filters="gopher,c4,fineweb", dedup="none")
    minhash = prepare(files, work / "prep_minhash", filters="none", dedup="minhash")
    results = {
        "corpus_mb": round(filters["bytes_in"] / 1e6, 2), "documents": filters["documents_in"],
        "tessera": {"filters_mb_per_s": filters["mb_per_s"], "minhash_mb_per_s": minhash["mb_per_s"],
                    "kept_by_filters": filters["documents_out"], "near_duplicates": minhash["removed"].get(
                        "near_duplicate", 0)},
        "filters": [f.name for f in build("gopher,c4,fineweb")],
    }
    if importlib.util.find_spec("datatrove"):
        results["datatrove"] = "installed but not wired: compare with the same rules by hand"
    else:
        results["datatrove"] = {"measured": False, "reason": "datatrove is not installed here",
                                "reference_from_issue": DATATROVE_REFERENCE}
    if importlib.util.find_spec("datasketch"):
        docs = [d.text for d in iter_documents(files)]
        results["datasketch"] = datasketch_agreement(docs)
    return results


def datasketch_agreement(docs: list[str]) -> dict:
    """Our MinHash LSH decisions vs datasketch MinHashLSH (same shingles, 14 × 8), first copy kept."""
    from datasketch import MinHash, MinHashLSH

    from data.dedup import MinHashDedup, simplify
    from data.text import normalize

    docs = [normalize(d) for d in docs]
    docs = [d for d in docs if d]
    dedup = MinHashDedup()
    start = time.perf_counter()
    ours_dup = [dup for at in range(0, len(docs), 500) for dup in dedup.duplicates(docs[at : at + 500])]
    ours_s = time.perf_counter() - start
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    start = time.perf_counter()
    theirs = []
    for i, d in enumerate(docs):
        words = simplify(d).split()
        m = MinHash(num_perm=112)
        m.update_batch([" ".join(words[k : k + 5]).encode() for k in range(max(1, len(words) - 4))])
        found = bool(lsh.query(m))
        theirs.append(found)
        if not found:
            lsh.insert(str(i), m)
    theirs_s = time.perf_counter() - start
    mb = sum(len(d.encode()) for d in docs) / 1e6
    same = sum(a == b for a, b in zip(ours_dup, theirs))
    return {"documents": len(docs), "agreement": round(same / len(docs), 4),
            "removed_tessera": sum(ours_dup), "removed_datasketch": sum(theirs),
            "tessera_mb_per_s": round(mb / ours_s, 3), "datasketch_mb_per_s": round(mb / theirs_s, 3)}


def print_table(results: dict) -> None:
    loader = results["loader"]
    print(f"\nloader: {loader['corpus_tokens'] / 1e6:.1f}M tokens in {loader['shards']} shards, seq_len "
          f"{loader['seq_len']}, micro-batch {loader['micro_batch']}, {loader['workers']} workers")
    for name, value in loader["tokens_per_s"].items():
        print(f"  {name:26s} {value / 1e6:8.2f} M tokens/s")
    if "note" in loader:
        print(f"  ({loader['note']})")
    prep = results["prep"]
    ours = prep["tessera"]
    print(f"\nprep: {prep['corpus_mb']} MB, {prep['documents']} documents, 1 process")
    print(f"  tessera filters ({', '.join(prep['filters'])}) {ours['filters_mb_per_s']:8.3f} MB/s")
    print(f"  tessera MinHash LSH 14x8 {ours['minhash_mb_per_s']:8.3f} MB/s")
    dt = prep["datatrove"]
    if isinstance(dt, dict):
        ref = dt["reference_from_issue"]
        print(f"  datatrove: not measured ({dt['reason']}); the issue's figures on this machine class: filters "
              f"{ref['filters_mb_per_s']} MB/s, MinHash {ref['minhash_mb_per_s']} MB/s → tessera is "
              f"{ours['filters_mb_per_s'] / ref['filters_mb_per_s']:.1f}x / "
              f"{ours['minhash_mb_per_s'] / ref['minhash_mb_per_s']:.1f}x")
    if "datasketch" in prep:
        ds = prep["datasketch"]
        print(f"  near-dup decisions vs datasketch MinHashLSH: {ds['agreement']:.2%} agree on {ds['documents']} "
              f"documents (removed {ds['removed_tessera']} vs {ds['removed_datasketch']}); datasketch "
              f"{ds['datasketch_mb_per_s']} MB/s, tessera {ds['tessera_mb_per_s']} MB/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a small corpus and few batches (about a minute)")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "data_throughput.json")
    parser.add_argument("--corpus-mb", type=float, default=None, help="loader corpus size (default 28, smoke 3)")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    args.corpus_mb = args.corpus_mb or (3.0 if args.smoke else 28.0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"smoke": args.smoke, "torch": torch.__version__, "cpus": os.cpu_count(),
                   "loader": loader_bench(args, work), "prep": prep_bench(args, work)}
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n→ {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
