"""``tessera ... --nproc N``: start N local ranks of a module, the way torchrun would.

Each child gets RANK/LOCAL_RANK/WORLD_SIZE and a free MASTER_PORT on 127.0.0.1. Signals sent to
this process (TERM, USR1, INT, HUP) reach every rank, so preemption works as under torchrun. When
a rank fails the others are stopped (TERM, then KILL after a grace period) and its status is
returned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from common.net import free_port

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
GRACE_S = 30.0  # time the other ranks get to stop (and checkpoint) after one failed


def spawn(module: str, args: list[str], nproc: int) -> int:
    """Run ``python -m module *args`` as ``nproc`` ranks; 0 when all succeed, else the first failure's
    status (128 + signal number for a rank killed by a signal)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        child_env = dict(
            os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=child_env))

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return _wait(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen]) -> int:
    while True:
        codes = [proc.poll() for proc in procs]
        failed = next((code for code in codes if code not in (None, 0)), None)
        if failed is not None:
            _stop(procs)
            return 128 - failed if failed < 0 else failed
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
