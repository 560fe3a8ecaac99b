import json

import pytest
import torch

from common.errors import UserError
from trainer import checkpoint
from trainer.distributed import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def save(writer: checkpoint.CheckpointWriter, step: int, payload: bytes = b"x" * 100):
    tmp = writer.begin(step)
    (tmp / "weights.bin").write_bytes(payload)
    state = {"step": step, "tokens_seen": 0, "world_size": 1, "strategy": "single", "format": "dcp", "guard": {}}
    return writer.commit(tmp, step, state)


def test_steps_latest_and_keep_last(tmp_path):
    writer = checkpoint.CheckpointWriter(tmp_path, keep_last=2, env=ENV)
    for step in (10, 20, 30):
        save(writer, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000020", "step_000030"]
    assert (tmp_path / "latest").read_text().strip() == "step_000030"
    assert checkpoint.latest(tmp_path) == tmp_path / "step_000030"
    assert checkpoint.read_state(checkpoint.resolve(tmp_path))["step"] == 30
    manifest = json.loads((tmp_path / "step_000030" / "manifest.json").read_text())["files"]
    assert manifest["weights.bin"]["bytes"] == 100 and len(manifest["weights.bin"]["sha256"]) == 64


def test_no_checkpoint_yet(tmp_path):
    assert checkpoint.latest(tmp_path) is None


def test_truncated_checkpoint_fails_with_one_line(tmp_path):
    writer = checkpoint.CheckpointWriter(tmp_path, keep_last=3, env=ENV)
    step_dir = save(writer, 5)
    with (step_dir / "weights.bin").open("r+b") as f:
        f.truncate(37)
    with pytest.raises(UserError) as info:
        checkpoint.resolve(tmp_path)
    assert str(info.value).count("\n") == 0
    assert "truncated" in str(info.value) and "weights.bin is 37 bytes" in str(info.value)


def test_interrupted_save_never_replaces_the_last_good_one(tmp_path):
    writer = checkpoint.CheckpointWriter(tmp_path, keep_last=3, env=ENV)
    save(writer, 5)
    tmp = writer.begin(6)  # a save that dies before commit: files half written, no manifest
    (tmp / "weights.bin").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path) == tmp_path / "step_000005"
    save(writer, 7)  # the next save cleans the leftover
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_step_dir_without_manifest_is_refused(tmp_path):
    (tmp_path / "step_000001").mkdir()
    with pytest.raises(UserError, match="incomplete"):
        checkpoint.resolve(tmp_path / "step_000001")
    with pytest.raises(UserError, match="not found"):
        checkpoint.resolve(tmp_path / "nope")
