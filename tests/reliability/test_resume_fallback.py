"""Auto-resume falls back to the newest step that verifies, with one warning line, when ``latest`` is
missing or names a missing, incomplete or damaged step; steps that exist but none verifies, or a
fresh run (checkpoint.resume=never) beside old steps, are refused in one line; a save replaces a
same-named step of an abandoned history and removes newer ones, so two histories never mix."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_runs import flip_bytes, one_error_line, run_overrides

from launch.cli import main
from launch.entry import load
from trainer.checkpoint import step_dirs, verify
from trainer.run import run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_steps(shards, tmp_path_factory) -> Path:
    """A finished run with checkpoints/step_000001 and step_000002 (latest)."""
    run_dir = tmp_path_factory.mktemp("two-steps") / "run"
    run(load(None, run_overrides(shards, run_dir, "checkpoint.every=1")), "pretrain")
    return run_dir


@pytest.fixture
def steps_copy(two_steps, tmp_path) -> Path:
    return Path(shutil.copytree(two_steps, tmp_path / "run"))


def resume(shards, run_dir, *extra):
    return run(load(None, run_overrides(shards, run_dir, "checkpoint.every=1", "train.max_steps=3", *extra)),
               "pretrain")


def names(run_dir) -> list[str]:
    return [p.name for p in step_dirs(run_dir / "checkpoints")]


def fallback_warning(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
             and r.getMessage().startswith("checkpoint.resume=auto: ")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


def damage_weights(step: Path) -> None:
    flip_bytes(step / "model" / "model.safetensors")


DAMAGE = {
    "missing": (lambda step: shutil.rmtree(step), "names step_000002, which does not exist"),
    "incomplete": (lambda step: (step / "manifest.json").unlink(), "is incomplete (no manifest.json)"),
    "damaged": (damage_weights, "does not match its sha256"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_bad_latest_falls_back_to_the_newest_verified_step(case, steps_copy, shards, caplog):
    root = steps_copy / "checkpoints"
    damage, reason = DAMAGE[case]
    damage(root / "step_000002")
    caplog.set_level(logging.INFO)
    result = resume(shards, steps_copy)
    line = fallback_warning(caplog)
    assert reason in line and "resuming from step_000001, the newest step that verifies" in line
    assert "resumed from" in caplog.text and "step_000001 at step 1" in caplog.text
    assert result.steps == 3
    assert names(steps_copy) == ["step_000003", "step_000002", "step_000001"]
    for step in step_dirs(root):
        verify(step)  # the damaged step_000002 was replaced by this run's own
    assert (root / "latest").read_text().strip() == "step_000003"
    steps = [json.loads(line)["step"] for line in (steps_copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_deleted_latest_resumes_the_newest_verified_step(steps_copy, shards, caplog):
    (steps_copy / "checkpoints" / "latest").unlink()
    caplog.set_level(logging.INFO)
    result = resume(shards, steps_copy)
    line = fallback_warning(caplog)
    assert "latest is missing; resuming from step_000002" in line
    assert result.steps == 3 and "at step 2" in caplog.text  # not a silent restart at step 1


def test_damaged_newer_steps_are_skipped_named_and_removed(steps_copy, shards, caplog):
    root = steps_copy / "checkpoints"
    stale = Path(shutil.copytree(root / "step_000002", root / "step_000009"))
    damage_weights(stale)
    damage_weights(root / "step_000002")
    (root / "latest").unlink()
    caplog.set_level(logging.INFO)
    result = resume(shards, steps_copy)
    line = fallback_warning(caplog)
    assert "resuming from step_000001" in line and "also unusable: step_000009, step_000002" in line
    assert result.steps == 3
    assert names(steps_copy) == ["step_000003", "step_000002", "step_000001"]  # step_000009 did not outlive it


def test_a_replaced_step_keeps_nothing_of_the_old_one(steps_copy, shards):
    root = steps_copy / "checkpoints"
    (root / "step_000002" / "from_the_old_run").write_text("x")
    resume(shards, steps_copy, f"checkpoint.resume={root / 'step_000001'}")
    assert not (root / "step_000002" / "from_the_old_run").exists()
    verify(root / "step_000002")
    assert not list(root.glob(".old_*")) and not list(root.glob(".tmp_*"))


def test_steps_that_all_fail_verification_are_refused(steps_copy, shards, capsys):
    root = steps_copy / "checkpoints"
    for step in step_dirs(root):
        damage_weights(step)
    assert main(["pretrain", *run_overrides(shards, steps_copy, "train.max_steps=3")]) == 2
    line = one_error_line(capsys, "pretrain")
    assert "and no other step under" in line and "(step_000001 fail verification)" in line
    assert names(steps_copy) == ["step_000002", "step_000001"] and not (root / "step_000003").exists()


def test_a_fresh_run_beside_old_steps_is_refused(steps_copy, shards, capsys):
    before = (steps_copy / "metrics.jsonl").read_text()
    assert main(["pretrain", *run_overrides(shards, steps_copy, "checkpoint.resume=never")]) == 2
    line = one_error_line(capsys, "pretrain")
    assert "checkpoint.resume=never, but" in line and "(newest step_000002)" in line
    assert (steps_copy / "metrics.jsonl").read_text() == before


def test_the_fallback_warning_is_one_line_on_stderr_of_a_real_run(steps_copy, shards):
    """The same through `python -m launch.cli pretrain` in its own process: exit 0, the warning on stderr."""
    (steps_copy / "checkpoints" / "latest").write_text("step_000007\n")
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "launch.cli", "pretrain",
                           *run_overrides(shards, steps_copy, "train.max_steps=3")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("checkpoint.resume=auto: ")]
    assert len(warnings) == 1 and "names step_000007, which does not exist" in warnings[0]
    assert (steps_copy / "checkpoints" / "latest").read_text().strip() == "step_000003"
