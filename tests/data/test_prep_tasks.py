"""The dedup stages across tasks give the streaming dedups' verdicts exactly."""

import json
import os
import random

import numpy as np
import pytest

from common.errors import UserError
from data.dedup import ExactDedup, MinHashDedup, exact_key, first_copies, greedy_near_duplicates, shared_buckets
from data.prep_tasks import PrepPlan


def test_only_a_kept_document_makes_a_duplicate():
    # A and B share a bucket of band 0, B and C one of band 1, A and C none: A stays, B goes, C stays
    # (union-find clusters would make {A, B, C} one cluster and drop C too).
    band0 = shared_buckets(np.array([[1, 1], [1, 1], [7, 7]], np.uint32), np.array([10, 11, 12]))
    band1 = shared_buckets(np.array([[5, 5], [3, 3], [3, 3]], np.uint32), np.array([10, 11, 12]))
    assert band0.tolist() == [[10, 0], [11, 0]] and band1[:, 0].tolist() == [11, 12]
    assert greedy_near_duplicates([band0, band1]).tolist() == [11]
    assert greedy_near_duplicates([np.zeros((0, 2), np.int64)]).tolist() == []
    assert shared_buckets(np.zeros((0, 3), np.uint32), np.zeros(0, np.int64)).shape == (0, 2)
    odd = shared_buckets(np.array([[1, 2, 3], [1, 2, 4], [1, 2, 3]], np.uint32), np.array([4, 5, 6]))
    assert odd.tolist() == [[4, 0], [6, 0]]


@pytest.mark.parametrize("rows", [2, 3])
def test_band_stages_equal_the_streaming_minhash_on_chains_of_near_copies(rows):
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(60)]
    texts = []
    for _ in range(40):  # chains: each copy edits the previous one, so far ends differ more than neighbours
        words = rng.choices(vocab, k=40)
        for _ in range(rng.randint(1, 5)):
            texts.append(" ".join(words))
            for _ in range(rng.randint(1, 6)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
    rng.shuffle(texts)
    streaming = MinHashDedup(bands=6, rows=rows)
    expected = np.flatnonzero(streaming.duplicates(texts))
    signatures = MinHashDedup(bands=6, rows=rows).signatures(texts)
    positions = np.arange(len(texts)) * 3 + 5  # any increasing positions
    bands = [shared_buckets(signatures[:, b * rows : (b + 1) * rows], positions) for b in range(6)]
    dropped = greedy_near_duplicates(bands)
    assert 20 < len(expected) < len(texts) - 20
    assert dropped.tolist() == positions[expected].tolist()
    union_find = sum(len(c) - 1 for c in _union_find_clusters(bands))  # datatrove's rule drops more
    assert union_find > len(expected)


def test_first_copies_equal_exact_dedup():
    texts = ["a b", "A, b!", "c", "a  b", "d", "c."]
    exact = ExactDedup()
    keys = np.array([int.from_bytes(exact_key(t), "little") for t in texts], np.uint64)
    assert first_copies(keys).tolist() == [not exact.is_duplicate(t) for t in texts] == [1, 0, 1, 0, 1, 0]


def test_files_are_dealt_in_contiguous_runs():
    plan = PrepPlan([f"f{i}" for i in range(7)], 3, {})
    assert [plan.files_of(t) for t in range(3)] == [["f0", "f1"], ["f2", "f3"], ["f4", "f5", "f6"]]
    assert [PrepPlan(["a"], 3, {}).files_of(t) for t in range(3)] == [[], [], ["a"]]


def test_prep_deals_bytes_cutting_plain_jsonl_at_line_starts_and_keeping_compressed_files_whole(tmp_path):
    """One big .jsonl, a .jsonl.gz and a .txt to 4 tasks: in order, the parts cover every file once; the
    .jsonl is cut at line starts near the equal shares of all bytes; the compressed file goes whole."""
    import gzip

    from data.prep_tasks import deal

    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": "word " * (i % 50)}) + "\n" for i in range(2000)))
    packed = tmp_path / "small.jsonl.gz"
    packed.write_bytes(gzip.compress(big.read_bytes()[:20_000]))
    text = tmp_path / "notes.txt"
    text.write_text("a line\n" * 500)
    files = [str(big), str(packed), str(text)]
    parts = deal(files, 4)
    flat = [p for task in parts for p in task]
    ranges = [p for p in flat if isinstance(p, dict)]
    assert [p for p in flat if isinstance(p, str)] == [str(packed), str(text)]
    assert [task[0] for task in parts] == ranges  # one range starts each task
    assert [r["start"] for r in ranges] == [0] + [r["end"] for r in ranges[:-1]]
    assert ranges[-1]["end"] == big.stat().st_size
    data = big.read_bytes()
    assert all(data[r["start"] - 1 : r["start"]] == b"\n" for r in ranges[1:])
    assert [r["record"] for r in ranges] == [data[: r["start"]].count(b"\n") for r in ranges]
    total = sum(map(os.path.getsize, files))
    longest = max(map(len, data.splitlines(keepends=True)))
    for task, r in enumerate(ranges[1:], 1):  # each cut at the first line start after its share's start
        assert 0 <= r["start"] - total * task // 4 < longest
    assert deal(files, 1) == [files]
    assert deal([str(packed)], 3) == [[], [str(packed)], []]  # its middle byte is in the second share


def _union_find_clusters(bands: list[np.ndarray]) -> list[set[int]]:
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for members in bands:
        for bucket in np.unique(members[:, 1]):
            docs = members[members[:, 1] == bucket, 0]
            for d in docs[1:]:
                parent[root(int(d))] = root(int(docs[0]))
    groups: dict[int, set[int]] = {}
    for x in parent:
        groups.setdefault(root(x), set()).add(x)
    return list(groups.values())


def test_a_rerun_keeps_finished_tasks_only_for_the_same_plan(tmp_path):
    from data.prep_tasks import plan_run, run_task, work_dir
    from data.prepare import PrepSettings

    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}.jsonl")
        files[-1].write_text(json.dumps({"text": f"document {i} " * 20}) + "\n")
    out = tmp_path / "out"
    assert plan_run(files, out, 3, PrepSettings(), "local")[1] == [0, 1, 2]
    run_task(work_dir(out), 0)
    run_task(work_dir(out), 2)
    assert plan_run(files, out, 3, PrepSettings(), "local")[1] == [1]
    files[2].write_text(json.dumps({"text": "changed " * 20}) + "\n")  # its task's input changed: redo it
    assert plan_run(files, out, 3, PrepSettings(), "local")[1] == [1, 2]
    assert plan_run(files, out, 3, PrepSettings(dedup="exact"), "local")[1] == [0, 1, 2]  # other settings
    assert not (work_dir(out) / "task-00000").exists()
    with pytest.raises(UserError, match="--tasks must be at least 1"):
        plan_run(files, out, 0, PrepSettings(), "local")
