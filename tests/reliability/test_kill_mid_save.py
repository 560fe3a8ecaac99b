"""SIGKILL in the middle of a checkpoint save (a real process, killed by the kernel: no cleanup):
`latest` still names the previous step, the next run resumes from it and ends with weights
byte-identical to an uninterrupted run's."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_runs import run_overrides

from launch.entry import load
from trainer.checkpoint import step_dirs, verify
from trainer.run import run

REPO = Path(__file__).resolve().parents[2]

# the real `tessera pretrain`, killed at one point of step 2's save
KILLED_AT = """
import os, signal, sys
from trainer import checkpoint

where = sys.argv.pop(1)
commit, replace = checkpoint.CheckpointWriter.commit, os.replace

def kill_in_commit(self, tmp, step, state):
    if step == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the files are written, no trainer_state.json or manifest yet
    return commit(self, tmp, step, state)

def kill_before_latest(src, dst):
    if str(src).endswith("latest.tmp") and "step_000002" in open(src).read():
        os.kill(os.getpid(), signal.SIGKILL)  # step_000002 complete and renamed, latest not yet moved
    return replace(src, dst)

if where == "before_manifest":
    checkpoint.CheckpointWriter.commit = kill_in_commit
else:
    checkpoint.os.replace = kill_before_latest

from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""

STEPS = ["checkpoint.every=1", "train.max_steps=3"]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(load(None, run_overrides(shards, run_dir, *STEPS)), "pretrain")
    return run_dir


def weights(run_dir: Path, step: int) -> bytes:
    return (run_dir / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before_manifest", "before_latest"])
def test_sigkill_mid_save_resumes_to_identical_weights(where, uninterrupted, shards, tmp_path):
    run_dir = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", KILLED_AT, where, "pretrain", *run_overrides(shards, run_dir, *STEPS)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000001"
    left = sorted(p.name for p in root.iterdir())
    if where == "before_manifest":
        assert left == [".tmp_step_000002", "latest", "step_000001"]
    else:
        assert left == ["latest", "latest.tmp", "step_000001", "step_000002"]  # the pointer never moved

    result = run(load(None, run_overrides(shards, run_dir, *STEPS)), "pretrain")
    assert result.steps == 3
    assert [p.name for p in step_dirs(root)] == ["step_000003", "step_000002", "step_000001"]
    for step in step_dirs(root):
        verify(step)
    assert not list(root.glob(".tmp_*")) and not list(root.glob(".old_*"))
    assert weights(run_dir, 3) == weights(uninterrupted, 3)
