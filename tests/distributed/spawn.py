"""Run a function on N ranks of a real gloo process group: fork-started processes, a free port.

``spawn(fn, world_size, *args)`` forks one process per rank with the torchrun variables set (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and returns every rank's
result. When a rank fails or dies, the others are killed (as torchrun does) and
:class:`RanksFailed` says which rank and why. Forking is ~2x faster than spawning (no re-import
of torch), which is what keeps the multi-process tests short on two cores.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed

from common.net import free_port


class RanksFailed(AssertionError):
    """``error`` is (exception type name, message) of the first rank that raised, if one did."""

    def __init__(self, message: str, exitcodes: list[int | None], error: tuple[str, str] | None) -> None:
        super().__init__(message)
        self.exitcodes = exitcodes
        self.error = error


@dataclasses.dataclass
class _Outcome:
    rank: int
    ok: bool
    value: Any


def _child(rank: int, world_size: int, port: int, env: dict[str, str], fn: Callable, args: tuple, out: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    os.environ.update(env)  # e.g. LOCAL_WORLD_SIZE=1: every rank a node of its own
    try:
        out.put(_Outcome(rank, True, fn(*args)))
    except BaseException as exc:  # report everything, including UserError lines, to the parent
        out.put(_Outcome(rank, False, (type(exc).__name__, str(exc), traceback.format_exc())))


def spawn(fn: Callable, world_size: int, *args: Any, env: dict[str, str] | None = None, timeout: float = 240,
          start: str = "fork") -> list:
    """``[fn(*args) on rank 0, ..., on rank N-1]``; raises RanksFailed if any rank fails.

    ``start="spawn"`` starts fresh interpreters instead (slower): what CUDA needs once anything in
    this process may have initialised it."""
    if start == "fork" and torch.distributed.is_initialized():  # the ranks would inherit it and hang on it
        raise RuntimeError("a process group is open in the test process: whatever opened it must destroy it")
    ctx = mp.get_context(start)
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, env or {}, fn, args, out), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    failure = error = None
    while len(results) < world_size and failure is None:
        try:
            outcome = out.get(timeout=0.2)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead:
                failure = f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
            elif time.monotonic() > deadline:
                failure = f"timed out after {timeout} s"
            continue
        if outcome.ok:
            results[outcome.rank] = outcome.value
        else:
            name, message, trace = outcome.value
            error = (name, message)
            failure = f"rank {outcome.rank} raised {name}: {message}\n{trace}"
    if failure is not None:
        time.sleep(0.5)  # a rank that crashed is often reaped just after its peers noticed
        died = [f"rank {r} died with exit code {p.exitcode}" for r, p in enumerate(procs) if (p.exitcode or 0) < 0]
        failure = "; ".join([*died, failure])
        for p in procs:
            if p.is_alive():
                p.kill()
    for p in procs:
        p.join(timeout=30)
    if failure is not None:
        raise RanksFailed(failure, [p.exitcode for p in procs], error)
    return [results[r] for r in range(world_size)]
