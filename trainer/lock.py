"""One run per run directory: rank 0 holds an exclusive ``flock`` on ``<log.dir>/run.lock`` for the run's life.

The lock belongs to the open file, so the OS drops it when the process ends, however it ends
(SIGKILL included): a stale lock file never blocks the next run. The file names the holder (pid,
host, start time) for the one line a second run on the same directory fails with. Only rank 0
writes the run directory, so only rank 0 locks it; every rank learns the outcome and fails together.
A filesystem that refuses locks altogether (Lustre without ``flock``) gets a warning, not a failure.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch

from common.errors import UserError
from trainer.distributed import DistEnv, all_reduce

LOCK = "run.lock"
log = logging.getLogger("tessera.trainer")


@contextlib.contextmanager
def run_lock(directory: Path, env: DistEnv) -> Iterator[None]:
    """Hold ``directory``'s run lock around the body (every rank enters it; rank 0 takes the lock)."""
    path = directory / LOCK
    handle = None
    if env.is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle = path.open("a+")  # not "w": the holder's line must survive a failed attempt
        except PermissionError as exc:
            raise UserError(f"log.dir {directory}: cannot write there ({exc.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            handle = None
        except OSError as exc:  # e.g. Lustre mounted without flock: ENOSYS; run unguarded rather than not at all
            log.warning("%s: the filesystem refuses locks (%s); a second run on this log.dir will not be stopped",
                        path, exc.strerror or exc)
        else:
            started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
            handle.flush()
    refused = all_reduce(torch.tensor([float(env.is_main and handle is None)], device=env.device)).item()
    if refused:
        holder = path.read_text().strip() if path.is_file() else ""
        raise UserError(f"{directory} is in use by another run ({holder or 'holder unknown'}; lock {path}): "
                        "wait for it to end, or set another log.dir")
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock
