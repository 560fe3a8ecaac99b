"""A damaged trainer_state.json or rank file whose manifest entry still matches (written that way, or
edited together with the manifest) stops the resume in one line naming the file, exit 2; one that no
longer matches its hash is passed over for an older step (see test_resume_fallback.py)."""

import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from reliability_runs import one_error_line, run_overrides

from common.manifest import write_manifest
from launch.cli import main
from launch.entry import load
from trainer.run import run


def step_of(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_000002"


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


STATES = {
    "not JSON": (b'{"step": 2, "tokens', "trainer_state.json is damaged (JSONDecodeError)"),
    "a field missing": (json.dumps({"step": 2, "tokens_seen": 128}).encode(),
                        "trainer_state.json is damaged (world_size, strategy"),
    "a list": (b"[2, 128]", "trainer_state.json is damaged (AttributeError)"),
    "a negative step": (None, "trainer_state.json is damaged (out of range)"),
}


@pytest.mark.parametrize("case", sorted(STATES))
@pytest.mark.parametrize("how", ["auto", "path"])
def test_a_damaged_trainer_state_is_one_line(case, how, run_copy, shards, capsys):
    step = step_of(run_copy)
    payload, message = STATES[case]
    if payload is None:
        payload = json.dumps({**json.loads((step / "trainer_state.json").read_text()), "step": -2}).encode()
    (step / "trainer_state.json").write_bytes(payload)
    write_manifest(step)  # the hashes agree: only the content can tell
    resume = [] if how == "auto" else [f"checkpoint.resume={step}"]
    assert main(["pretrain", *run_overrides(shards, run_copy, "train.max_steps=3", *resume)]) == 2
    line = one_error_line(capsys, "pretrain")
    assert f"checkpoint {step}: {message}" in line and "cannot be resumed" in line
    assert (run_copy / "checkpoints" / "latest").read_text().strip() == "step_000002"


RANKS = {
    "truncated": (lambda data: data[: len(data) // 2], "is not plain tensor data and was not loaded"),
    "random text": (lambda data: b"hello world\n" * 40, "is not plain tensor data and was not loaded"),
    "no loader state": (lambda data: saved({"x": torch.zeros(2)}), "holds no data-loader and RNG state"),
    "a list": (lambda data: saved([1, 2]), "holds no data-loader and RNG state"),
    "junk loader state": (lambda data: saved({"loader": {"junk": 1}, "rng": {}}), "cannot resume the data loader"),
    "junk RNG state": (None, "loader or RNG state is damaged (ValueError"),
}


@pytest.mark.parametrize("case", sorted(RANKS))
def test_a_damaged_rank_file_is_one_line(case, run_copy, shards, capsys):
    step = step_of(run_copy)
    rank = step / "rank_00000.pt"
    change, message = RANKS[case]
    if change is None:  # the real loader state beside an RNG state without its streams
        rank.write_bytes(saved({**torch.load(rank, weights_only=True), "rng": {"python": torch.zeros(1)}}))
    else:
        rank.write_bytes(change(rank.read_bytes()))
    write_manifest(step)
    assert main(["pretrain", *run_overrides(shards, run_copy, "train.max_steps=3")]) == 2
    line = one_error_line(capsys, "pretrain")
    assert message in line and (str(rank) in line or f"checkpoint {step}" in line)
    assert not (run_copy / "checkpoints" / "step_000003").exists()


def test_a_changed_trainer_state_falls_back_to_the_step_before(shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run(load(None, run_overrides(shards, run_dir, "checkpoint.every=1")), "pretrain")
    state = step_of(run_dir) / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 2', '"step": 9'))  # the manifest's hash now disagrees
    caplog.set_level(logging.INFO)
    result = run(load(None, run_overrides(shards, run_dir, "train.max_steps=3")), "pretrain")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"checkpoint file {state} does not match its sha256" in w and "resuming from step_000001" in w
               for w in warnings), warnings
    assert result.steps == 3
    shutil.rmtree(run_dir)


@pytest.mark.parametrize("command", ["export", "generate"])
def test_a_step_without_its_manifest_is_not_loaded(command, run_copy, tmp_path, capsys):
    """A save that never finished (no manifest.json beside trainer_state.json / the rank files)."""
    step = step_of(run_copy)
    unfinished = step.rename(run_copy / "checkpoints" / ".tmp_step_000002")
    (unfinished / "manifest.json").unlink()
    args = {"export": ["export", "--checkpoint", str(unfinished), "--out", str(tmp_path / "hf")],
            "generate": ["generate", "--checkpoint", str(unfinished), "--prompt", "Once", "--max-new-tokens", "2"]}
    assert main(args[command]) == 2
    assert f"checkpoint {unfinished} is incomplete (no manifest.json)" in one_error_line(capsys, command)
    assert not (tmp_path / "hf").exists()
