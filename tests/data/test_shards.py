import hashlib
import json
import shutil

import numpy as np
import pytest

from common.errors import UserError
from data.shard_set import ShardSet, Source
from data.shards import ShardError, ShardManifest, ShardWriter, check_shard, open_shard, read_documents, verify_shard
from launch.cli import main


def test_manifest_and_round_trip(text_shards, tokenizer):
    m = ShardManifest.load(text_shards)
    assert m.kind == "text" and m.dtype == "<u2" and len(m.shards) >= 4
    assert m.tokenizer_sha256 == tokenizer.sha256
    raw = json.loads((text_shards / "manifest.json").read_text())
    assert raw["version"] == 3 and raw["num_samples"] == m.num_samples == 1000
    for info in m.shards:
        data = (text_shards / info.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (info.bytes, info.sha256)
    shards = ShardSet([Source(str(text_shards))])
    assert shards.num_samples == 1000 and int(shards.length().sum()) == m.num_tokens
    first = next(p for p in text_shards.parents[1].glob("subset*/stories.txt"))
    story = first.read_text().split("\n\n")[0]
    tokens = shards.read(0)
    assert tokens[-1] == tokenizer.eos_id
    assert tokenizer.decode(tokens[:-1]) == story + "\n"


@pytest.mark.parametrize("fixture", ["text_shards", "preference_shards"])
def test_stock_webdataset_reads_our_packed_tars(fixture, request):
    """Stock webdataset yields packs; split by their lengths they are our samples, in order."""
    import webdataset as wds

    root = request.getfixturevalue(fixture)
    m = ShardManifest.load(root)
    ours = ShardSet([Source(str(root))])
    urls = [str(root / info.name) for info in m.shards]
    packs = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(packs) < m.num_samples / 10  # packed, not a tar sample per document
    sample = 0
    for pack in packs:
        assert pack["__key__"] == f"{sample:010d}"  # a pack's key: the number of its first sample
        lengths = pack["lengths.npy"]
        assert lengths.shape[1] == len(m.fields)
        for field, name in enumerate(m.fields):
            pieces = np.split(pack[f"{name}.npy"], np.cumsum(lengths[:, field])[:-1])
            for k, piece in enumerate(pieces):
                np.testing.assert_array_equal(piece, ours.read(sample + k, field))
        sample += len(lengths)
    assert sample == m.num_samples


def test_sft_and_preference_kinds(sft_shards, preference_shards, tokenizer):
    sft = ShardSet([Source(str(sft_shards))])
    ids, mask = sft.read(0, 0), sft.read(0, 1)
    assert sft.fields == ("input_ids", "loss_mask") and len(ids) == len(mask) and mask.dtype == np.uint8
    assert ids[0] == tokenizer.bos_id and mask.any() and not mask.all()
    assert tokenizer.decode(ids[mask == 1]).endswith("<|end|>")
    pref = ShardSet([Source(str(preference_shards))])
    prompt, chosen, rejected = (pref.read(5, f) for f in range(3))
    assert tokenizer.decode(prompt).endswith("<|assistant|>\n")
    assert tokenizer.decode(chosen).endswith("<|end|>") and tokenizer.decode(rejected).endswith("<|end|>")


def test_uint32_for_large_vocabularies(tmp_path):
    w = ShardWriter(tmp_path, kind="text", vocab_size=70_000, tokenizer_sha256="x")
    w.write({"tokens": [1, 69_999, 65_536]})
    m = w.close()
    assert m.dtype == "<u4"
    np.testing.assert_array_equal(ShardSet([Source(str(tmp_path))]).read(0), [1, 69_999, 65_536])


def test_packs_split_by_payload_and_round_trip_arrays_and_metadata(tmp_path):
    """Several packs a shard (pack_bytes) and packs cut where a shard fills: every sample reads back as
    written, by the index and by walking the tar, with its metadata (a sample may have none)."""
    rng = np.random.default_rng(0)
    fields = ("prompt", "chosen", "rejected")
    samples = [[rng.integers(0, 500, rng.integers(0, 40)) for _ in fields] for _ in range(300)]
    writer = ShardWriter(tmp_path, kind="preference", vocab_size=500, tokenizer_sha256="x", shard_bytes=12_000,
                         pack_bytes=1000)
    for i, arrays in enumerate(samples):
        writer.write(dict(zip(fields, arrays)), {"id": f"doc-{i}", "é": i} if i % 3 else None)
    m = writer.close()
    shards = ShardSet([Source(str(tmp_path))])
    got, packs = [], 0
    for info in m.shards:
        walked = verify_shard(m, info)[1]
        packs += len(walked.metadata)
        got += list(read_documents(m, info))
    assert len(m.shards) > 3 and packs > 2 * len(m.shards)
    assert m.num_tokens == sum(a.size for arrays in samples for a in arrays)
    for i, (arrays, (read, meta)) in enumerate(zip(samples, got, strict=True)):
        assert meta == ({"id": f"doc-{i}", "é": i} if i % 3 else None)
        for field, name in enumerate(fields):
            np.testing.assert_array_equal(read[name], arrays[field])
            np.testing.assert_array_equal(shards.read(i, field), arrays[field])


def test_a_pack_whose_lengths_disagree_with_its_arrays_is_malformed(text_shards, tmp_path, capsys):
    """A tar that hashes as its manifest says but whose lengths.npy lies: `tessera shard verify` names it."""
    root = shutil.copytree(text_shards, tmp_path / "c")
    m = ShardManifest.load(root)
    info, path = m.shards[0], root / m.shards[0].name
    data = bytearray(path.read_bytes())
    lengths = data.index(b"\x93NUMPY", data.index(b"0000000000.lengths.npy"))
    start = lengths + 10 + int.from_bytes(data[lengths + 8 : lengths + 10], "little")
    data[start : start + 4] = (int.from_bytes(data[start : start + 4], "little") + 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    raw = json.loads((root / "manifest.json").read_text())
    raw["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(json.dumps(raw))
    assert main(["shard", "verify", str(root)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"shard {root / info.name} is malformed: pack 0000000000: its lengths disagree with its "
                      "arrays' sizes")


def corrupt_copy(src, dst, how):
    shutil.copytree(src, dst)
    m = ShardManifest.load(dst)
    path = dst / m.shards[1].name
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[5000] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "header":
        data[257:262] = b"xxxxx"
    path.write_bytes(bytes(data))
    return m.shards[1].name


@pytest.mark.parametrize(("how", "message"), [
    ("flip", "does not match its sha256"), ("truncate", "is .* bytes, the manifest says"),
])
def test_corrupt_shard_fails_with_its_name_or_is_skipped(text_shards, tmp_path, how, message):
    name = corrupt_copy(text_shards, tmp_path / "c", how)
    with pytest.raises(ShardError, match=f"{name}.*{message}|{message}.*{name}") as exc:
        ShardSet([Source(str(tmp_path / "c"))])
    assert "\n" not in str(exc.value) and name in str(exc.value)
    shards = ShardSet([Source(str(tmp_path / "c"))], on_corrupt="skip")
    m = ShardManifest.load(tmp_path / "c")
    assert len(shards.skipped) == 1 and name in shards.skipped[0]
    assert sum(n for _, n in shards.source_shards[0]) == m.num_samples - m.shards[1].samples


def test_malformed_tar_without_checksum(text_shards, tmp_path):
    name = corrupt_copy(text_shards, tmp_path / "c", "header")
    with pytest.raises(ShardError, match=f"{name} is malformed: no tar header"):
        ShardSet([Source(str(tmp_path / "c"))], verify_checksums=False)


def test_missing_shard_and_manifest(text_shards, tmp_path):
    shutil.copytree(text_shards, tmp_path / "c")
    (tmp_path / "c" / "00002.tar").unlink()
    with pytest.raises(ShardError, match=r"00002\.tar is missing"):
        ShardSet([Source(str(tmp_path / "c"))])
    with pytest.raises(UserError, match="no shard manifest"):
        ShardSet([Source(str(tmp_path / "nothing"))])


def test_pipe_urls_are_refused_unless_allowed(text_shards, tmp_path):
    m = ShardManifest.load(text_shards)
    info = m.shards[0]
    info.name = f"pipe:cat {text_shards / info.name}"
    with pytest.raises(ShardError, match=r"pipe: URL; set data\.allow_pipe=true"):
        open_shard(m, info)
    buf = open_shard(m, info, allow_pipe=True)
    assert len(check_shard(buf, m, info, verify_checksum=True).offsets) == info.samples


def test_writer_refuses_a_used_directory(text_shards):
    with pytest.raises(UserError, match="already holds shards"):
        ShardWriter(text_shards, kind="text", vocab_size=100, tokenizer_sha256="x")


def test_open_memory_maps_are_bounded(text_shards, monkeypatch):
    import data.shard_set

    monkeypatch.setattr(data.shard_set, "MAX_OPEN_SHARDS", 2)
    shards = ShardSet([Source(str(text_shards))])
    expected = [shards.read(i).copy() for i in range(shards.num_samples)]
    assert len(shards._open) <= 2
    again = ShardSet([Source(str(text_shards))])
    for i in reversed(range(again.num_samples)):
        np.testing.assert_array_equal(again.read(i), expected[i])
    lengths = again.length()
    pieces = again.gather(np.arange(again.num_samples), np.zeros(again.num_samples, np.int64), lengths)
    np.testing.assert_array_equal(pieces, np.concatenate(expected))
    assert len(again._open) <= 2
