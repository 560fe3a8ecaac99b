"""A checkpoint file changed after the save (same size, so only its sha256 tells) is never loaded:
resume, export, generate and model.init stop with one line naming the file, exit status 2."""

import json

import pytest
from reliability_runs import flip_bytes, one_error_line, run_overrides

from launch.cli import main


def commands(run_dir, shards, tmp_path):
    step = run_dir / "checkpoints" / "step_000002"
    return {
        "resume": ("pretrain", run_overrides(shards, run_dir, "train.max_steps=3")),
        "model.init": ("pretrain", run_overrides(shards, tmp_path / "fresh", f"model.init={step}")),
        "export": ("export", ["--checkpoint", str(run_dir / "checkpoints"), "--out", str(tmp_path / "hf")]),
        "generate": ("generate", ["--checkpoint", str(step), "--prompt", "Once", "--max-new-tokens", "2"]),
    }


@pytest.mark.parametrize("use", ["resume", "model.init", "export", "generate"])
def test_changed_weights_are_refused_naming_the_file(use, run_copy, shards, tmp_path, capsys):
    weights = run_copy / "checkpoints" / "step_000002" / "model" / "model.safetensors"
    size = weights.stat().st_size
    flip_bytes(weights)
    assert weights.stat().st_size == size
    command, args = commands(run_copy, shards, tmp_path)[use]
    assert main([command, *args]) == 2
    line = one_error_line(capsys, command)
    assert f"checkpoint file {weights} does not match its sha256" in line
    assert not (tmp_path / "hf").exists()
    assert (run_copy / "checkpoints" / "latest").read_text().strip() == "step_000002"  # nothing saved after


def test_a_changed_dcp_shard_is_refused_on_resume(run_copy, shards, capsys):
    step = run_copy / "checkpoints" / "step_000002"
    shard = next((step / "dcp").glob("*.distcp"))
    flip_bytes(shard)
    assert main(["pretrain", *run_overrides(shards, run_copy, "train.max_steps=3")]) == 2
    assert f"checkpoint file {shard} does not match its sha256" in one_error_line(capsys, "pretrain")
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["latest", "step_000002"]


def test_an_edited_manifest_entry_is_refused(run_copy, shards, capsys):
    """The rank file is the one pickle-shaped file of a single-process step: its hash guards it too."""
    step = run_copy / "checkpoints" / "step_000002"
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["rank_00000.pt"]["sha256"] = "0" * 64
    (step / "manifest.json").write_text(json.dumps(manifest))
    assert main(["pretrain", *run_overrides(shards, run_copy, "train.max_steps=3")]) == 2
    assert f"checkpoint file {step / 'rank_00000.pt'} does not match" in one_error_line(capsys, "pretrain")


def test_an_intact_checkpoint_still_resumes_and_exports(run_copy, shards, tmp_path, capsys):
    assert main(["pretrain", *run_overrides(shards, run_copy, "train.max_steps=3")]) == 0
    assert (run_copy / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert main(["export", "--checkpoint", str(run_copy / "checkpoints"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("text", ["", '{"files": {"trainer_state.json": {"by', "[]"])
def test_an_empty_or_truncated_manifest_is_refused_on_resume(text, run_copy, shards, capsys):
    step = run_copy / "checkpoints" / "step_000002"
    (step / "manifest.json").write_text(text)
    assert main(["pretrain", *run_overrides(shards, run_copy, "train.max_steps=3")]) == 2
    assert f"checkpoint {step}: manifest.json is unreadable" in one_error_line(capsys, "pretrain")
