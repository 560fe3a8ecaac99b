"""data.on_corrupt=skip never skips silently: a warning line at the start, the count on every metrics
line, the list in the run directory and in the run's result. A real corrupted shard, a real run."""

import json
import logging
import shutil

from reliability_runs import run_overrides

from launch.entry import load
from trainer.callbacks.skipped_shards import SKIPPED_SHARDS
from trainer.run import run


def test_a_skipped_shard_is_reported_at_start_in_metrics_and_in_the_run_dir(shards, tmp_path, caplog):
    data = shutil.copytree(shards, tmp_path / "shards")
    bad = sorted(data.glob("*.tar"))[1]
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the sha256 tells
    bad.write_bytes(bytes(raw))
    shard_count = len(list(data.glob("*.tar")))
    run_dir = tmp_path / "run"
    cfg = load(None, [*run_overrides(data, run_dir), "data.on_corrupt=skip"])
    with caplog.at_level(logging.WARNING, logger="tessera.trainer"):
        result = run(cfg, "pretrain")

    assert len(result.skipped_shards) == 1 and bad.name in result.skipped_shards[0]
    warnings = [r.getMessage() for r in caplog.records if "skipped as corrupt" in r.getMessage()]
    assert warnings == [f"data.on_corrupt=skip: 1 of {shard_count} training shards skipped as corrupt "
                        f"(first: {result.skipped_shards[0]}); list in {run_dir / SKIPPED_SHARDS}"]
    assert (run_dir / SKIPPED_SHARDS).read_text() == result.skipped_shards[0] + "\n"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["data/skipped_shards"] == 1 for line in lines)

    # the shards repaired, the run continues: no stale list, no count
    shutil.copyfile(shards / bad.name, bad)
    run(load(None, [*run_overrides(data, run_dir, "train.max_steps=3"), "data.on_corrupt=skip"]), "pretrain")
    assert not (run_dir / SKIPPED_SHARDS).exists()
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and "data/skipped_shards" not in last


def test_nothing_skipped_nothing_reported(trained_run):
    assert not (trained_run / SKIPPED_SHARDS).exists()
    assert all("data/skipped_shards" not in json.loads(line)
               for line in (trained_run / "metrics.jsonl").read_text().splitlines())


def test_a_skipped_validation_shard_is_reported_too(shards, tmp_path, caplog):
    valid = shutil.copytree(shards, tmp_path / "valid")
    bad = sorted(valid.glob("*.tar"))[0]
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    run_dir = tmp_path / "run"
    cfg = load(None, [*run_overrides(shards, run_dir), f"data.valid={valid}", "data.on_corrupt=skip",
                      "train.eval_every=1", "train.eval_steps=1"])
    with caplog.at_level(logging.WARNING, logger="tessera.trainer"):
        result = run(cfg, "pretrain")
    assert result.skipped_shards == []  # the training shards are whole
    warnings = [r.getMessage() for r in caplog.records if "validation shards skipped" in r.getMessage()]
    shard_count = len(list(valid.glob("*.tar")))
    assert len(warnings) == 1 and warnings[0].startswith(
        f"data.on_corrupt=skip: 1 of {shard_count} validation shards skipped as corrupt (first: shard {bad}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["eval/skipped_shards"] for line in lines] == [1, 1] and "data/skipped_shards" not in lines[0]
