"""One run per run directory: a second `tessera pretrain` on a live run's log.dir fails in one line naming
the holder (pid, host) and touches nothing; once the holder dies (SIGKILL) the OS frees the lock."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_runs import run_overrides

from launch.entry import load
from trainer.lock import LOCK
from trainer.run import run

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def pretrain(*overrides: str, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "pretrain", *overrides], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_second_run_on_a_live_run_directory_fails_naming_the_holder(shards, tmp_path):
    run_dir = tmp_path / "run"
    first = pretrain(*run_overrides(shards, run_dir, "train.max_steps=1000000", "log.every=100000"))
    try:
        lock = run_dir / LOCK
        wait_for(lambda: first.poll() is not None or (lock.is_file() and f"pid {first.pid} " in lock.read_text()))
        wait_for(lambda: first.poll() is not None or (run_dir / "metrics.jsonl").is_file())
        assert first.poll() is None, first.communicate()[1][-2000:]
        metrics_before = (run_dir / "metrics.jsonl").stat().st_mtime_ns

        second = pretrain(*run_overrides(shards, run_dir, "train.max_steps=3"))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        holder = f"pid {first.pid} on {socket.gethostname()} since "
        assert err.startswith(f"tessera pretrain: error: {run_dir} is in use by another run ({holder}")
        assert err.count("\n") == 1 and "set another log.dir" in err
        assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == metrics_before  # not rewritten by the second run
        assert not (run_dir / "checkpoints").exists()
    finally:
        first.kill()
        first.communicate()

    # SIGKILL left the lock file behind; the lock itself died with its process
    assert f"pid {first.pid} " in (run_dir / LOCK).read_text()
    result = run(load(None, run_overrides(shards, run_dir, "checkpoint.resume=never")), "pretrain")
    assert result.steps == 2
    assert (run_dir / LOCK).read_text().startswith(f"pid {os.getpid()} on ")


def test_a_filesystem_without_locks_warns_and_runs(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    import torch

    from trainer.distributed import DistEnv
    from trainer.lock import run_lock

    def no_locks(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    with caplog.at_level("WARNING", logger="tessera.trainer"), run_lock(tmp_path / "run", env):
        entered = True
    assert entered
    assert caplog.messages == [f"{tmp_path / 'run' / LOCK}: the filesystem refuses locks (Function not implemented); "
                               "a second run on this log.dir will not be stopped"]
