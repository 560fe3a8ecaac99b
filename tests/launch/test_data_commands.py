"""`tessera prep`, `tessera tokenizer train` and `tessera shard` end to end, in process, on real data."""

import json

import pytest

from data.shards import ShardManifest
from launch.cli import main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples" / "data"
    out = tmp_path_factory.mktemp("cli")
    assert main(["prep", str(examples / "pretrain_c4_demo.jsonl"), "--out", str(out / "prep")]) == 0
    assert main(["tokenizer", "train", str(out / "prep" / "documents.jsonl"), "--vocab-size", "600",
                 "--out", str(out / "tok")]) == 0
    assert main(["shard", str(out / "prep" / "documents.jsonl"), "--tokenizer", str(out / "tok"),
                 "--out", str(out / "shards"), "--shard-size", "64KB", "--append-eos", "--workers", "2"]) == 0
    return out, examples


def test_prep_tokenizer_shard(pipeline, capsys):
    out, _ = pipeline
    report = json.loads((out / "prep" / "report.json").read_text())
    kept = (out / "prep" / "documents.jsonl").read_text().splitlines()
    assert report["documents_in"] == 300 and report["documents_out"] == len(kept) > 100
    manifest = ShardManifest.load(out / "shards")
    assert manifest.num_samples == len(kept) and len(manifest.shards) > 3
    assert (out / "tok" / "tokenizer_config.json").is_file()


def test_sft_and_preference_shards(pipeline, tmp_path):
    out, examples = pipeline
    assert main(["shard", str(examples / "sft_alpaca_en_demo.json"), "--tokenizer", str(out / "tok"),
                 "--out", str(tmp_path / "sft"), "--kind", "sft", "--workers", "1"]) == 0
    assert ShardManifest.load(tmp_path / "sft").kind == "sft"
    assert main(["shard", str(examples / "pref_llamafactory_dpo_en_demo.json"), "--tokenizer", str(out / "tok"),
                 "--out", str(tmp_path / "pref"), "--kind", "preference", "--max-len", "256", "--skip-bad"]) == 0
    manifest = ShardManifest.load(tmp_path / "pref")
    assert manifest.num_samples + sum(manifest.extra["skipped"].values()) == 300


@pytest.mark.parametrize(("argv", "message"), [
    (["prep", "missing.jsonl", "--out", "{tmp}/p"], "no such file or directory: missing.jsonl"),
    (["prep", "{examples}/pretrain_c4_demo.jsonl", "--out", "{tmp}/p", "--filters", "gopher,c5"],
     "unknown filter 'c5'"),
    (["tokenizer", "train", "{examples}/pretrain_c4_demo.jsonl", "--vocab-size", "100", "--out", "{tmp}/t"],
     "--vocab-size 100 is too small"),
    (["shard", "{examples}/pretrain_c4_demo.jsonl", "--tokenizer", "{tmp}/none", "--out", "{tmp}/s"],
     "no tokenizer at"),
    (["shard", "{examples}/pretrain_c4_demo.jsonl", "--tokenizer", "{tok}", "--out", "{tmp}/s",
      "--shard-size", "lots"], "bad size 'lots'"),
    (["shard", "{examples}/pretrain_tinyshakespeare.txt", "--tokenizer", "{tok}", "--out", "{tmp}/s",
      "--kind", "sft"], "conversations must be .jsonl or .json records"),
    (["shard", "{examples}/pretrain_c4_demo.jsonl", "--tokenizer", "{tok}", "--out", "{tmp}/s", "--kind", "sft"],
     "unrecognised format"),
])
def test_bad_input_is_one_line(pipeline, tmp_path, capsys, argv, message):
    out, examples = pipeline
    argv = [a.format(examples=examples, tmp=tmp_path, tok=out / "tok") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
