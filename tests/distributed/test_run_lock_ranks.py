"""The run-directory lock on two ranks: rank 0 takes it, and when it is held elsewhere every rank fails."""

from __future__ import annotations

import fcntl

from spawn import spawn

from common.errors import UserError
from trainer.distributed import init_distributed, teardown
from trainer.lock import LOCK, run_lock


def enter_lock(directory):
    """What this rank saw: the lock file's first words (rank 0, inside), None (rank 1, inside), or the error."""
    env = init_distributed(need_group=True, timeout_s=60)
    try:
        with run_lock(directory, env):
            return (directory / LOCK).read_text().split()[:2] if env.is_main else None
    except UserError as exc:
        return str(exc)
    finally:
        teardown(barrier=False)


def test_rank_0_takes_the_lock(tmp_path):
    pid_line, _ = spawn(enter_lock, 2, tmp_path / "run", timeout=120)
    assert pid_line[0] == "pid" and pid_line[1].isdigit()


def test_every_rank_fails_when_another_run_holds_it(tmp_path):
    (tmp_path / LOCK).write_text("pid 4242 on elsewhere since 2026-01-01T00:00:00+00:00\n")
    with (tmp_path / LOCK).open("r") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        errors = spawn(enter_lock, 2, tmp_path, timeout=120)
    assert errors[0] == errors[1] and "in use by another run (pid 4242 on elsewhere since" in errors[0]
