"""Bad data in ends in one line (exit 2) or a counted skip: malformed JSON lines (--skip-bad counts
them), record errors as file:line, invalid UTF-8 counted (a non-text file refused), empty inputs,
token ids outside the vocabulary, shard names leaving the shard directory, bad mixture weights,
data.valid pointing nowhere, a non-mapping config section."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from reliability_runs import one_error_line, run_overrides

from data.shards import ShardManifest, check_shard, open_shard
from launch.cli import main

GOOD = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
NO_ANSWER = {"messages": [{"role": "user", "content": "Hi there"}]}


@pytest.fixture
def tokenizer_dir(shards):
    return shards.parent / "tokenizer"


def sft_file(tmp_path, *lines: str):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def shard_sft(source, tokenizer_dir, out, *extra):
    return main(["shard", str(source), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--kind", "sft",
                 "--workers", "1", *extra])


def test_skip_bad_skips_and_counts_malformed_json_lines(tmp_path, tokenizer_dir, capsys):
    source = sft_file(tmp_path, json.dumps(GOOD), '{"messages": [', json.dumps(NO_ANSWER), json.dumps(GOOD), "nope")
    assert shard_sft(source, tokenizer_dir, tmp_path / "out", "--skip-bad") == 0
    out = capsys.readouterr().out
    assert "2 sft samples" in out and "skipped      2  not valid JSON" in out and "no assistant turn" in out
    manifest = ShardManifest.load(tmp_path / "out")
    assert manifest.num_samples == 2
    assert manifest.extra["skipped"] == {"not valid JSON": 2, "no assistant turn": 1}


def test_a_malformed_json_line_without_skip_bad_names_file_and_line(tmp_path, tokenizer_dir, capsys):
    source = sft_file(tmp_path, json.dumps(GOOD), "", '{"messages": [')
    assert shard_sft(source, tokenizer_dir, tmp_path / "out") == 2
    assert f"error: {source}:3: not valid JSON" in one_error_line(capsys, "shard")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_bad_record_names_file_and_line_like_json_errors(tmp_path, tokenizer_dir, capsys):
    source = sft_file(tmp_path, json.dumps(GOOD), "", json.dumps(NO_ANSWER))
    assert shard_sft(source, tokenizer_dir, tmp_path / "out") == 2
    assert f"error: {source}:3: no assistant turn" in one_error_line(capsys, "shard")
    text = tmp_path / "docs.jsonl"
    text.write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
    assert main(["prep", str(text), "--out", str(tmp_path / "prep")]) == 2
    assert f"error: {text}:3: no text field 'text'" in one_error_line(capsys, "prep")


def test_invalid_utf8_is_replaced_and_counted_in_the_report(tmp_path, capsys):
    source = tmp_path / "latin1.jsonl"
    source.write_bytes(b'{"text": "caf\xe9 au lait, ' + b"a pleasant drink " * 20 + b'"}\n')
    assert main(["prep", str(source), "--out", str(tmp_path / "prep"), "--filters", "none", "--dedup", "none"]) == 0
    assert f"replaced      1  bytes that are not UTF-8 in {source}" in capsys.readouterr().out
    report = json.loads((tmp_path / "prep" / "report.json").read_text())
    assert report["invalid_utf8_bytes"] == {str(source): 1}
    [doc] = [json.loads(line) for line in (tmp_path / "prep" / "documents.jsonl").read_text().splitlines()]
    assert doc["text"].startswith("caf\ufffd au lait")


@pytest.mark.parametrize("command", ["prep", "tokenizer", "shard"])
def test_random_bytes_are_not_text(command, tmp_path, tokenizer_dir, capsys):
    source = tmp_path / "noise.txt"
    source.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    args = {"prep": ["prep", str(source), "--out", str(tmp_path / "o")],
            "tokenizer": ["tokenizer", "train", str(source), "--vocab-size", "320", "--out", str(tmp_path / "o")],
            "shard": ["shard", str(source), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o")]}[command]
    assert main(args) == 2
    assert "bytes are not UTF-8: not a text file" in one_error_line(capsys, command)
    assert not (tmp_path / "o" / "documents.jsonl").exists() and not (tmp_path / "o" / "tokenizer.json").exists()
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize(("command", "message"), [
    ("prep", "no documents in {source}: the inputs are empty"),
    ("tokenizer", "the tokenizer saw no text to train on"),
    ("shard", "no samples to write"),
])
def test_empty_inputs_fail_in_one_line(command, message, tmp_path, tokenizer_dir, capsys):
    source = tmp_path / "empty.txt"
    source.write_text("\n  \n")
    out = tmp_path / "o"
    args = {"prep": ["prep", str(source), "--out", str(out)],
            "tokenizer": ["tokenizer", "train", str(source), "--vocab-size", "320", "--out", str(out)],
            "shard": ["shard", str(source), "--tokenizer", str(tokenizer_dir), "--out", str(out)]}[command]
    assert main(args) == 2
    assert message.format(source=source) in one_error_line(capsys, command)
    assert not out.exists() or not [p for p in out.iterdir() if p.name != "documents.jsonl.partial"]


def rewrite_manifest(root, change) -> None:
    raw = json.loads((root / "manifest.json").read_text())
    change(raw)
    (root / "manifest.json").write_text(json.dumps(raw))


def test_a_token_id_outside_the_vocabulary_names_the_shard(shards, tmp_path, capsys):
    root = shutil.copytree(shards, tmp_path / "shards")
    manifest = ShardManifest.load(root)
    info = manifest.shards[1]
    index = check_shard(open_shard(manifest, info), manifest, info, verify_checksum=True)
    path = root / info.name
    data = bytearray(path.read_bytes())
    at = int(index.offsets[3, 0]) + 2  # sample 3's second token
    data[at:at + 2] = np.uint16(999).tobytes()
    path.write_bytes(bytes(data))
    digest = hashlib.sha256(bytes(data)).hexdigest()  # as if made so: the checksum agrees, the ids do not

    def set_digest(raw):
        raw["shards"][1]["sha256"] = digest

    rewrite_manifest(root, set_digest)
    assert main(["pretrain", *run_overrides(root, tmp_path / "run")]) == 2
    line = one_error_line(capsys, "pretrain")
    assert f"shard {path}: sample 3 holds token id 999, not below the vocabulary size 320" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main(["pretrain", *run_overrides(root, tmp_path / "run"), "data.on_corrupt=skip"]) == 0
    assert "sample 3 holds token id 999" in (tmp_path / "run" / "skipped_shards.txt").read_text()


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/../../outside.tar"])
def test_a_shard_name_leaving_the_shard_directory_is_refused(name, shards, tmp_path, capsys):
    root = shutil.copytree(shards, tmp_path / "shards")
    shutil.copy(root / ShardManifest.load(root).shards[0].name, tmp_path / "outside.tar")

    def rename(raw):
        raw["shards"][0]["name"] = name

    rewrite_manifest(root, rename)
    assert main(["pretrain", *run_overrides(root, tmp_path / "run")]) == 2
    assert f"shard name {name!r} leaves the shard directory" in one_error_line(capsys, "pretrain")


@pytest.mark.parametrize("weight", ["0", "-1", "0.0"])
def test_a_mixture_weight_not_above_zero_is_refused(weight, shards, tmp_path, capsys):
    mixture = f"data.train=[{{path: {shards}, weight: 1}}, {{path: {shards}, weight: {weight}}}]"
    assert main(["pretrain", *run_overrides(shards, tmp_path / "run"), mixture]) == 2
    assert "data.train[1].weight: weight must be > 0" in one_error_line(capsys, "pretrain")
    assert not (tmp_path / "run").exists()


def test_data_valid_pointing_nowhere_is_refused_at_the_start(shards, tmp_path, capsys):
    nowhere = tmp_path / "no-such-dir"
    assert main(["pretrain", *run_overrides(shards, tmp_path / "run"), f"data.valid={nowhere}",
                 "train.eval_every=0"]) == 2
    assert f"data.valid: no shard manifest at {nowhere}" in one_error_line(capsys, "pretrain")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_section_that_is_not_a_mapping_is_refused_even_with_overrides(shards, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: 5\n")
    assert main(["pretrain", "--config", str(config), *run_overrides(shards, tmp_path / "run")]) == 2
    assert "model: must be a mapping of keys (a section), got 5" in one_error_line(capsys, "pretrain")
    assert os.listdir(tmp_path) == ["run.yaml"]
