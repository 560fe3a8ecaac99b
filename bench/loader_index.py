"""Loader start-up at scale (not a test): seconds and memory per rank and per worker, 1M–100M samples.

Each row runs in a fresh process: build the :class:`data.shard_set.ShardSet`, then one rank's epoch
plan (rank 0 of 8, seq_len 2048, as a trainer does before its first batch), in ``samples`` mode
(SFT, preference, ...) and ``rows`` mode (packed CLM). Columns: seconds to open the shard set and
to plan; resident memory added by each (RSS after, and the peak); the bytes a DataLoader worker
started with spawn is sent (the pickled stream; fork workers share the parent's pages). Then the
rank reads its first 250 batches of 8 through the plan (``samples``: each sample's array;
``rows``: ``plan.rows``): CPU seconds of the first 50 (the plan's first spans computed), CPU ms a
batch over the next 200, and the anonymous resident memory after them (not the shards' mapped
pages). Memory is measured after imports (the peak, VmHWM, reset there).

* **index-only** sets: manifest + ``NNNNN.idx.npy`` per shard + sparse tars (only their first
  header on disk), ``--per-shard`` samples each; start-up never reads payload, so this is the
  start-up of a real set of that many samples with ``data.verify_checksums=false`` (for the batches
  the shards are taken as checked: their payload reads as zeros).
* **real** sets: tars written by ``ShardWriter`` (one short document a sample, ~1 KiB in the tar),
  with checksums at start (the default) and without.
* **mixture** sets: three index-only sources weighted as a web, code and math mixture
  (``MIXTURE``: 70/20/10% of the samples, weights 0.5/0.3/0.2, so the last is upsampled), read as
  one ``data.train`` list.

With ``--base DIR`` (another checkout, e.g. ``git archive main``) every row is run by that code
too, on the same sets. With ``--per-batch``, the loader's speed after start-up too: CPU
milliseconds per batch of 8 of the in-process loader (CLM rows at seq 2048 and 128, MLM chunks at
128) on 1,000 TinyStories documents, this tree and ``--base`` alternating, the median of 5 (CPU
time, not wall time: it holds on a machine shared with other jobs).

    PYTHONPATH=. python bench/loader_index.py [--sizes 1M,10M,100M] [--real-sizes 100K,1M]
        [--mixture-sizes 1M,10M,100M] [--base DIR] [--per-batch] [--work DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, WORLD = 2048, 8
MIXTURE = ((0.7, 0.5), (0.2, 0.3), (0.1, 0.2))  # (share of the samples, weight) of each source

PROBE = r"""
import json, pickle, sys, time
import numpy as np
from data.shard_set import ShardSet, Source
from data.stream import SampleStream

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))

def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

path, mode, verify, seq_len, world = sys.argv[1], sys.argv[2], sys.argv[3] == "1", *map(int, sys.argv[4:])
sources = [Source(where, float(weight)) for where, weight in (p.rsplit("=", 1) for p in path.split(","))]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from here: imports are not counted
base, base_anon = rss(), anon()
t0 = time.perf_counter()
shards = ShardSet(sources, verify_checksums=verify)
t1 = time.perf_counter()
after_set = rss()
stream = SampleStream(shards, mode=mode, seq_len=seq_len, seed=0, rank=0, world_size=world,
                      batch_size=8)
plan = stream.plan(0)
t2 = time.perf_counter()
out = {
    "samples": shards.num_samples, "open_s": t1 - t0, "plan_s": t2 - t1, "units": plan.num_units,
    "set_mb": (after_set - base) / 2**20, "rank_mb": (rss() - base) / 2**20, "peak_mb": (peak() - base) / 2**20,
    "worker_mb": len(pickle.dumps(stream)) / 2**20, "set_pickle_mb": len(pickle.dumps(shards)) / 2**20,
}
if not verify:
    shards._checked.update(range(len(shards.shard_start) - 1))  # index-only tars: the payload reads as zeros
cpu = [time.process_time()]
for j in range(250):
    positions = np.arange(j * 8, j * 8 + 8) * world % plan.num_units  # small sets wrap round
    if mode == "rows":
        plan.rows(positions, (0,))
    else:
        ids = plan.samples(positions) if hasattr(plan, "samples") else [plan.sample(int(p)) for p in positions]
        [shards.read(int(i)) for i in ids]
    if j in (49, 249):
        cpu.append(time.process_time())
out.update(warm_s=cpu[1] - cpu[0], batch_ms=(cpu[2] - cpu[1]) / 200 * 1000, steady_mb=(anon() - base_anon) / 2**20)
print(json.dumps(out))
"""


# CPU ms a batch (over 200 batches) and a digest of the first 200 batches (to compare two trees)
BATCH_PROBE = r"""
import hashlib, json, sys, time
from data.config import DataConfig
from data.loader import build_loader
from data.tokenizer import load_tokenizer
path, tokenizer, objective, seq_len = sys.argv[1], load_tokenizer(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cfg = DataConfig.from_dict({"train": path, "seq_len": seq_len, "num_workers": 0})
it = iter(build_loader(cfg, objective=objective, tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=8, seed=0))
next(it)
start = time.process_time()
for _ in range(200):
    next(it)
ms = (time.process_time() - start) / 200 * 1000
digest = hashlib.sha256()  # the first 200 batches, to compare the trees' batches
it = iter(build_loader(cfg, objective=objective, tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=8, seed=0))
for batch in (next(it) for _ in range(200)):
    for key in sorted(batch):
        digest.update(key.encode() + batch[key].numpy().tobytes())
print(json.dumps([ms, digest.hexdigest()]))
"""
BATCH_CASES = (("clm", 2048), ("clm", 128), ("mlm", 128))


def per_batch(work: Path, base: Path | None) -> list[dict]:
    """CPU ms per batch of the in-process loader, this tree and ``base`` on the same tars."""
    from data.make_shards import make_shards
    from data.readers import iter_documents
    from data.tokenizer import train_tokenizer

    stories = ROOT / "examples" / "data" / "pretrain_tinystories_valid_head.txt"
    train_tokenizer([d.text for d in iter_documents([stories])], work / "tokenizer", vocab_size=700,
                    num_sentinels=16)
    (work / "stories.txt").write_text("\n\n".join(stories.read_text().split("\n\n")[:1000]))
    make_shards([str(work / "stories.txt")], work / "tokenizer", work / "batches", shard_bytes=150_000,
                append_eos=True, txt_mode="block")
    trees = [("after", ROOT, work / "batches")]
    if base:
        trees.append(("before", base, work / "batches"))
    times: dict[tuple, list[float]] = {}
    for _ in range(5):
        for code, tree, path in trees:
            for objective, seq_len in BATCH_CASES:
                env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
                argv = [sys.executable, "-c", BATCH_PROBE, str(path), str(work / "tokenizer"), objective, str(seq_len)]
                done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, cwd=tree)
                times.setdefault((code, objective, seq_len), []).append(json.loads(done.stdout.splitlines()[-1])[0])
    return [{"code": code, "objective": o, "seq_len": n, "cpu_ms_per_batch": round(float(np.median(t)), 3)}
            for (code, o, n), t in times.items()]


def parse_count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def label(n: int) -> str:
    return f"{n // 10**6}M" if n >= 10**6 and n % 10**6 == 0 else f"{n // 1000}K"


def first_header() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("0000000000.tokens.npy")
        info.size = 0
        tar.addfile(info, io.BytesIO())
    return buf.getvalue()[:512]


def index_only_set(root: Path, samples: int, per_shard: int) -> Path:
    """A manifest, index files and sparse tars for ``samples`` one-to-192-token documents."""
    from data.shards import INDEX_SUFFIX, ShardInfo, ShardManifest

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    header, infos = first_header(), []
    for shard, at in enumerate(range(0, samples, per_shard)):
        n = min(per_shard, samples - at)
        counts = rng.integers(1, 193, n, dtype=np.int64)
        offsets = 640 + 1024 * np.arange(n, dtype=np.int64)  # a header block, then the .npy header
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.stack([offsets, counts])[:, :, None], allow_pickle=False)
        index = buf.getvalue()
        name = f"{shard:05d}.tar"
        (root / name).with_suffix(INDEX_SUFFIX).write_bytes(index)
        size = 1024 * n + 1024
        with (root / name).open("wb") as f:
            f.write(header)
            f.truncate(size)  # sparse: the payload is never read at start
        infos.append(ShardInfo(name, n, int(counts.sum()), size, "0" * 64, len(index),
                               hashlib.sha256(index).hexdigest()))
    ShardManifest("text", "<u2", "bench", 512, infos, root).save()
    return root


def real_set(root: Path, samples: int, per_shard: int) -> Path:
    from data.shards import ShardWriter

    rng = np.random.default_rng(0)
    writer = ShardWriter(root, kind="text", vocab_size=512, tokenizer_sha256="bench", shard_bytes=per_shard * 1024)
    for length in rng.integers(1, 193, samples).tolist():
        writer.write({"tokens": rng.integers(0, 512, length)})
    writer.close()
    return root


def mixture_set(root: Path, samples: int, per_shard: int) -> str:
    """Index-only sources of ``MIXTURE``'s shares of ``samples``, as ``path=weight,...``."""
    root.mkdir(parents=True)
    return ",".join(f"{index_only_set(root / f'source{i}', round(samples * share), per_shard)}={weight}"
                    for i, (share, weight) in enumerate(MIXTURE))


def probe(code: Path, sources: str, mode: str, verify: bool) -> dict:
    """One row in a fresh process; ``sources``: a shard directory, or ``path=weight,...``."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    sources = ",".join(p if "=" in p else f"{p}=1" for p in sources.split(","))
    argv = [sys.executable, "-c", PROBE, sources, mode, "1" if verify else "0", str(SEQ_LEN), str(WORLD)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, cwd=code)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1M,10M,100M", help="index-only sets (samples)")
    parser.add_argument("--real-sizes", default="100K,1M", help="real tar sets (~1 KiB a sample on disk)")
    parser.add_argument("--mixture-sizes", default="1M,10M,100M", help="index-only three-source mixtures (samples)")
    parser.add_argument("--per-shard", type=int, default=50_000, help="samples per shard")
    parser.add_argument("--base", type=Path, default=None, help="another checkout to run alike (see above)")
    parser.add_argument("--per-batch", action="store_true", help="also CPU ms per batch, this tree vs --base")
    parser.add_argument("--work", type=Path, default=None, help="where the sets go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "loader_index.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loader_index_", dir=args.work))
    rows = []
    try:
        makers = {"index-only": index_only_set, "real": real_set, "mixture": mixture_set}
        for kind, sizes in (("index-only", args.sizes), ("real", args.real_sizes), ("mixture", args.mixture_sizes)):
            for n in [parse_count(s) for s in sizes.split(",") if s]:
                path = work / f"{kind}-{label(n)}"
                start = time.perf_counter()
                where = str(makers[kind](path, n, args.per_shard))
                print(f"made {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
                codes = [("before", args.base, where)] if args.base else []
                codes.append(("after", ROOT, where))
                for verify in ([True, False] if kind == "real" else [False]):
                    for code, tree, where in codes:
                        for mode in ("samples", "rows"):
                            row = {"set": kind, "samples": n, "shards": -(-n // args.per_shard), "code": code,
                                   "checksums_at_start": verify, "mode": mode, **probe(tree, where, mode, verify)}
                            rows.append(row)
                            print(json.dumps(row), flush=True)
                shutil.rmtree(path)
        batches = per_batch(work, args.base) if args.per_batch else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    for row in batches:
        print(f"per batch: {row['code']:6s} {row['objective']} seq {row['seq_len']:4d}: "
              f"{row['cpu_ms_per_batch']:.3f} CPU ms")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seq_len": SEQ_LEN, "world_size": WORLD, "per_shard": args.per_shard,
                                     "rows": rows, "per_batch": batches}, indent=1) + "\n")
    print(f"\n→ {args.json}")
    return 0


def print_table(rows: list[dict]) -> None:
    print(f"\n| set | samples | code | checksums at start | mode | open s | plan s | set MB | rank MB | peak MB "
          f"| worker MB | first 50 batches CPU s | CPU ms a batch | anon MB after 250 batches |\n|{'---|' * 14}")
    for r in rows:
        checked = "yes" if r["checksums_at_start"] else "no"
        head = f"| {r['set']} | {label(r['samples'])} | {r['code']} | {checked} | {r['mode']} |"
        if "error" in r:
            print(f"{head} error: {r['error']} |")
            continue
        print(f"{head} {r['open_s']:.2f} | {r['plan_s']:.2f} | {r['set_mb']:.0f} | {r['rank_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['worker_mb']:.1f} | {r['warm_s']:.2f} | {r['batch_ms']:.3f} | "
              f"{r['steady_mb']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
