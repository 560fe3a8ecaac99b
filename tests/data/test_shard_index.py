"""The index file written beside each tar, lazy checks, format-1 and format-2 directories and `tessera shard verify`."""

import hashlib
import io
import itertools
import json
import logging
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from data.epoch_plan import EpochOrder, EpochPlan, _window_order, epoch_order
from data.shard_set import ShardSet, Source
from data.shards import INDEX_SUFFIX, ShardError, ShardManifest, check_shard, load_index, open_shard
from data.stream import SampleStream
from launch.cli import main


@pytest.mark.parametrize("fixture", ["text_shards", "sft_shards", "preference_shards"])
def test_the_index_file_equals_a_walk_of_the_tar(fixture, request):
    root = request.getfixturevalue(fixture)
    m = ShardManifest.load(root)
    assert m.version == 3
    for info in m.shards:
        walked = check_shard(open_shard(m, info), m, info, verify_checksum=True)
        index = load_index(m, info)
        assert (root / info.name).with_suffix(INDEX_SUFFIX).stat().st_size == info.index_bytes
        np.testing.assert_array_equal(index.offsets, walked.offsets)
        np.testing.assert_array_equal(index.counts, walked.counts)


def test_start_up_holds_nothing_per_sample(text_shards):
    """Arrays held at start are per shard (cumulative counts), not per sample; so is what a worker gets."""
    shards = ShardSet([Source(str(text_shards))], verify_checksums=False)
    num_shards = len(ShardManifest.load(text_shards).shards)
    arrays = {k: v.size for k, v in vars(shards).items() if isinstance(v, np.ndarray)}
    assert arrays == {"shard_start": num_shards + 1}
    assert not shards._indexes and not shards._open and not shards._resident
    shards.read(999)  # touches the last shard only
    assert list(shards._indexes) == list(shards._open) == [num_shards - 1]
    worker = pickle.loads(pickle.dumps(shards))
    assert not worker._indexes and not worker._open
    np.testing.assert_array_equal(worker.read(999), shards.read(999))


def corrupt(root, shard: int, *, index: bool = False) -> str:
    info = ShardManifest.load(root).shards[shard]
    path = (root / info.name).with_suffix(INDEX_SUFFIX) if index else root / info.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 tells
    path.write_bytes(bytes(data))
    return path.name


def test_a_damaged_shard_is_found_when_first_read_without_start_checks(text_shards, tmp_path):
    root = shutil.copytree(text_shards, tmp_path / "c")
    name = corrupt(root, 1)
    shards = ShardSet([Source(str(root))], verify_checksums=False)  # nothing hashed at start
    start, end = shards.shard_start[1], shards.shard_start[2]
    shards.read(int(start) - 1)
    shards.read(int(end))
    with pytest.raises(ShardError, match=f"{name} does not match its sha256.*found when first read") as exc:
        shards.read(int(start))
    assert "\n" not in str(exc.value) and f"tessera shard verify {root}" in str(exc.value)
    skipping = ShardSet([Source(str(root))], verify_checksums=False, on_corrupt="skip")
    with pytest.raises(ShardError, match="found when first read"):  # the order is fixed: no skip now
        skipping.read(int(start))
    with pytest.raises(ShardError, match=f"{name} does not match its sha256"):
        ShardSet([Source(str(root))])  # the default checks at start


def test_a_damaged_index_is_named_and_skipped_like_a_shard(text_shards, tmp_path):
    root = shutil.copytree(text_shards, tmp_path / "c")
    name = corrupt(root, 2, index=True)
    with pytest.raises(ShardError, match=f"index .*{name} does not match its size and sha256"):
        ShardSet([Source(str(root))])
    shards = ShardSet([Source(str(root))], on_corrupt="skip")
    m = ShardManifest.load(root)
    assert len(shards.skipped) == 1 and name in shards.skipped[0]
    assert sum(n for _, n in shards.source_shards[0]) == m.num_samples - m.shards[2].samples
    assert shards.length()[shards.shard_start[2] : shards.shard_start[3]].sum() == 0
    lazy = ShardSet([Source(str(root))], verify_checksums=False)
    with pytest.raises(ShardError, match=f"index .*{name}"):
        lazy.read(int(lazy.shard_start[2]))


def format_2_copy(src, dst):
    """The same samples, shard for shard, as format 2 wrote them: a tar sample per sample
    (``{number}.{field}.npy``), an index file per tar, manifest version 2."""
    m = ShardManifest.load(src)
    shards = ShardSet([Source(str(src))])
    raw = json.loads((src / "manifest.json").read_text())
    raw["version"] = 2
    dst.mkdir()
    sample = 0
    for info, entry in zip(m.shards, raw["shards"]):
        path, rows = dst / info.name, []
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(info.samples):
                offsets, counts = [], []
                for field, name in enumerate(m.fields):
                    array = shards.read(sample, field)
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, array, allow_pickle=False)
                    member = tarfile.TarInfo(f"{sample:010d}.{name}.npy")
                    member.size = len(buf.getvalue())
                    offsets.append(tar.offset + 512 + member.size - array.nbytes)
                    counts.append(array.size)
                    tar.addfile(member, io.BytesIO(buf.getvalue()))
                rows.append(offsets + counts)
                sample += 1
        index = path.with_suffix(INDEX_SUFFIX)
        np.save(index, np.array(rows, np.int64).reshape(-1, 2, len(m.fields)).transpose(1, 0, 2).copy())
        for key, file in (("", path), ("index_", index)):
            entry[f"{key}bytes"] = file.stat().st_size
            entry[f"{key}sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(raw))
    return dst


def format_1_copy(src, dst):
    """The same samples as a format-1 directory: format 2's tars, no index files."""
    format_2_copy(src, dst)
    raw = json.loads((dst / "manifest.json").read_text())
    raw["version"] = 1
    for shard in raw["shards"]:
        del shard["index_bytes"], shard["index_sha256"]
        (dst / shard["name"]).with_suffix(INDEX_SUFFIX).unlink()
    (dst / "manifest.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize(("fixture", "objective"), [("text_shards", "clm"), ("sft_shards", "sft")])
def test_format_2_directories_load_and_batch_exactly_as_the_packed_shards(fixture, objective, tokenizer, tmp_path,
                                                                         capsys, request):
    """Packing changes the bytes on disk, not the samples: with the same samples per shard, the loader's
    batches of a format-2 copy equal the packed shards' (so the same order and the same learning)."""
    from data.config import DataConfig
    from data.loader import build_loader

    packed = request.getfixturevalue(fixture)
    old = format_2_copy(packed, tmp_path / "old")
    assert main(["shard", "verify", str(old), str(packed)]) == 0, capsys.readouterr().out
    disk = [sum(f.stat().st_size for f in root.iterdir()) for root in (old, packed)]
    assert disk[1] < disk[0] / 3
    batches = []
    for root in (old, packed):
        cfg = DataConfig(train=str(root), seq_len=64)
        loader = build_loader(cfg, objective=objective, tokenizer=tokenizer, rank=0, world_size=1,
                              micro_batch_size=4, seed=5)
        batches.append([{k: v.clone() for k, v in b.items()} for b in itertools.islice(iter(loader), 40)])
    assert len(batches[0]) == 40
    for before, after in zip(*batches):
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key]), key


def test_a_format_1_directory_loads_alike_with_a_one_line_hint(text_shards, tmp_path, caplog):
    old = format_1_copy(text_shards, tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="tessera.data"):
        before = ShardSet([Source(str(old))])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "format-1 shards without index files; 1000 samples indexed at start" in lines[0]
    assert "re-shard with `tessera shard`" in lines[0]
    after = ShardSet([Source(str(format_2_copy(text_shards, tmp_path / "format-2")))])
    assert after.fingerprint() == before.fingerprint()  # the same tars: a checkpoint on either resumes on the other
    np.testing.assert_array_equal(epoch_order(before, 3, 1), epoch_order(after, 3, 1))
    np.testing.assert_array_equal(before.counts, after.counts)
    plans = [EpochPlan(s, EpochOrder(s, 3, 1), "rows", 64, unit_seed=(3, 1, 9)) for s in (before, after)]
    positions = np.arange(0, plans[0].num_units, 7)
    np.testing.assert_array_equal(plans[0].rows(positions, (0,))[0][0], plans[1].rows(positions, (0,))[0][0])


def test_window_shuffle_is_a_stable_sort_of_each_window_by_its_keys():
    """The epoch order of before (one lexsort of all samples by window, then key) kept exactly."""
    for n, buffer in [(10_007, 64), (1000, 16), (5, 8), (24_581, 8192)]:
        ids = np.arange(n)
        keys = np.random.default_rng(5).random(n)
        reference = ids[np.lexsort((keys, ids // buffer))]
        np.testing.assert_array_equal(ids[_window_order(keys, buffer)], reference)
        assert not np.array_equal(reference, ids)


def test_shard_verify_command(text_shards, tmp_path, capsys):
    assert main(["shard", "verify", str(text_shards)]) == 0
    assert f"{text_shards}: " in capsys.readouterr().out
    root = shutil.copytree(text_shards, tmp_path / "c")
    tar = corrupt(root, 1)
    index = corrupt(root, 3, index=True)
    assert main(["shard", "verify", str(root)]) == 2
    lines = capsys.readouterr().out.splitlines()
    damaged = [line for line in lines if "does not match" in line]
    assert len(damaged) == 2 and tar in damaged[0] and index in damaged[1]
    assert lines[-1] == "2 damaged shard(s)"
    old = format_1_copy(text_shards, tmp_path / "old")
    assert main(["shard", "verify", str(old)]) == 0
    assert "format 1: no index files" in capsys.readouterr().out


def test_a_shard_found_damaged_in_a_loader_worker_is_one_line(text_shards, tokenizer, tmp_path):
    from data.config import DataConfig
    from data.loader import build_loader

    root = shutil.copytree(text_shards, tmp_path / "c")
    names = [corrupt(root, shard) for shard in range(len(ShardManifest.load(root).shards))]
    cfg = DataConfig(train=str(root), seq_len=32, num_workers=2, verify_checksums=False)
    loader = build_loader(cfg, objective="clm", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=2, seed=0)
    with pytest.raises(ShardError, match=r"does not match its sha256.*found when first read") as exc:
        next(iter(loader))
    assert "\n" not in str(exc.value) and any(name in str(exc.value) for name in names)


def test_a_chunks_plan_cuts_every_sample_once(text_shards):
    shards = ShardSet([Source(str(text_shards))], verify_checksums=False)
    stream = SampleStream(shards, mode="chunks", seq_len=50, seed=2, rank=0, world_size=1, batch_size=4)
    plan = stream.plan(0)
    got = sorted(tuple(chunk.tolist()) for chunk in plan.chunks(np.arange(plan.num_units)))
    expected = []
    for sample in range(shards.num_samples):
        tokens = shards.read(sample).tolist()
        expected += [tuple(tokens[at : at + 50]) for at in range(0, max(1, len(tokens)), 50)]
    assert got == sorted(expected)
