"""Rank, world size and rendezvous address from whichever launcher started this process.

torchrun, ``accelerate launch`` and the DeepSpeed launcher export the torchrun variables (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); MPI launchers (DeepSpeed's ``--launcher
openmpi|mpich``) export their own; ``srun`` exports SLURM_PROCID and friends. :func:`setup` reads
whichever is present, exports the torchrun variables so the trainer needs to know only one set, and
checks that the rendezvous can be reached within a timeout, so a wrong address fails with one line
instead of hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, MutableMapping

from common.errors import UserError
from common.net import free_port

RDZV_TIMEOUT_VAR = "TESSERA_RDZV_TIMEOUT"  # seconds a rank waits for the rendezvous address to answer
DEFAULT_RDZV_TIMEOUT = 300.0
SLURM_PORT_BASE = 15000  # srun without torchrun: MASTER_PORT = base + job id % 10000 unless set


@dataclasses.dataclass(frozen=True)
class LauncherEnv:
    """Where this process sits in the job, as torchrun would describe it."""

    launcher: str  # torchrun | accelerate | deepspeed | mpi | slurm | env | single
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    node: str  # this process's host (the SLURM node name under SLURM)

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}) on "
            f"{self.node} via {self.launcher}, backend {backend()}, rendezvous "
            f"{self.master_addr}:{self.master_port}"
        )


def detect(environ: Mapping[str, str] | None = None) -> LauncherEnv:
    """Read the launcher's variables (torchrun-style first, then MPI, then SLURM, else one process)."""
    e = os.environ if environ is None else environ
    node = e.get("SLURMD_NODENAME") or socket.gethostname()
    if "RANK" in e and "WORLD_SIZE" in e:
        return _from_torchrun(e, node)
    if "OMPI_COMM_WORLD_RANK" in e:
        return _from_mpi(e, node, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                         "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    if "PMI_RANK" in e:
        return _from_mpi(e, node, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    if "SLURM_PROCID" in e and "SLURM_STEP_NUM_TASKS" in e:  # inside an srun step, not the batch shell
        return _from_slurm(e, node)
    port = _int(e, "MASTER_PORT") if "MASTER_PORT" in e else free_port()
    return LauncherEnv("single", 0, 0, 1, 1, e.get("MASTER_ADDR", "127.0.0.1"), port, node)


def export(dist: LauncherEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Set the torchrun variables that ``torch.distributed`` and the trainer read."""
    e = os.environ if environ is None else environ
    e.update(
        RANK=str(dist.rank),
        LOCAL_RANK=str(dist.local_rank),
        WORLD_SIZE=str(dist.world_size),
        LOCAL_WORLD_SIZE=str(dist.local_world_size),
        MASTER_ADDR=dist.master_addr,
        MASTER_PORT=str(dist.master_port),
    )


EXPORTED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def launched(environ: MutableMapping[str, str] | None = None) -> Iterator[LauncherEnv]:
    """:func:`setup` for one run, the exported variables put back as they were afterwards: a run called
    in this process (a notebook, a bench) must not leave torchrun's variables behind, or a library
    used later (accelerate, under transformers' Trainer) starts a process group of its own."""
    e = os.environ if environ is None else environ
    saved = {name: e.get(name) for name in EXPORTED}
    try:
        yield setup(e)
    finally:
        for name, value in saved.items():
            if value is None:
                e.pop(name, None)
            else:
                e[name] = value


def backend() -> str:
    """nccl where this process can see a GPU, gloo otherwise."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def setup(environ: MutableMapping[str, str] | None = None) -> LauncherEnv:
    """Detect, export the torchrun variables and make sure the rendezvous answers (ranks > 0)."""
    e = os.environ if environ is None else environ
    dist = detect(e)
    export(dist, e)
    if dist.world_size > 1:
        timeout = _float(e, RDZV_TIMEOUT_VAR, DEFAULT_RDZV_TIMEOUT)
        wait_for_rendezvous(dist.master_addr, dist.master_port, timeout, listen=dist.rank == 0)
    return dist


def wait_for_rendezvous(addr: str, port: int, timeout: float, listen: bool = False) -> None:
    """Fail with one line when ``addr`` does not resolve, or (``listen`` false) nothing answers on
    ``addr:port`` within ``timeout`` seconds. Rank 0 hosts the store, so it only needs the name."""
    try:
        socket.getaddrinfo(addr, port)
    except socket.gaierror:
        raise UserError(f"rendezvous host {addr!r} does not resolve; check MASTER_ADDR") from None
    if listen:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(timeout, 0.1))):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"no rendezvous at {addr}:{port} after {timeout:g}s; check MASTER_ADDR/MASTER_PORT and "
                    f"that rank 0 is running (wait longer with {RDZV_TIMEOUT_VAR}=SECONDS)"
                ) from None
            time.sleep(0.5)


def expand_hostlist(spec: str) -> list[str]:
    """SLURM's compressed host list ("n[1-3,7],gpu-[08-09]") as a list of names, in order."""
    hosts: list[str] = []
    for item in _split_top_level(spec):
        match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", item)
        if not match:
            if "[" in item or "]" in item:
                raise UserError(f"cannot parse the SLURM host list {spec!r}")
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise UserError(f"cannot parse the SLURM host list {spec!r}")
            width = len(lo)
            hosts += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


def slurm_hosts(nodelist: str) -> list[str]:
    """Host names of a SLURM node list: ``scontrol show hostnames`` where present, else our parser."""
    if shutil.which("scontrol"):
        try:  # scontrol retries for a minute when it finds no slurm.conf: don't wait that long
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10)
        except subprocess.TimeoutExpired:
            out = None
        if out is not None and out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_hostlist(nodelist)


def _from_torchrun(e: Mapping[str, str], node: str) -> LauncherEnv:
    if any(k.startswith("ACCELERATE_") for k in e):  # accelerate starts ranks through torchrun
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in e:
        launcher = "torchrun"
    elif "CROSS_RANK" in e:  # set by deepspeed.launcher.launch
        launcher = "deepspeed"
    else:
        launcher = "env"
    world = _int(e, "WORLD_SIZE")
    local_world = _int(e, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in e else _int(e, "LOCAL_SIZE", world)
    return _checked(
        launcher, _int(e, "RANK"), _int(e, "LOCAL_RANK", 0), world, local_world,
        e.get("MASTER_ADDR", "127.0.0.1"), _int(e, "MASTER_PORT", 29500), node,
    )


def _from_mpi(e: Mapping[str, str], node: str, rank: str, size: str, local: str, local_size: str) -> LauncherEnv:
    world = _int(e, size)
    if world > 1 and "MASTER_ADDR" not in e:
        raise UserError("started by MPI without MASTER_ADDR; export MASTER_ADDR (and MASTER_PORT) to all ranks")
    return _checked(
        "mpi", _int(e, rank), _int(e, local, 0), world, _int(e, local_size, 1),
        e.get("MASTER_ADDR", "127.0.0.1"), _int(e, "MASTER_PORT", 29500), node,
    )


def _from_slurm(e: Mapping[str, str], node: str) -> LauncherEnv:
    nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise UserError("SLURM_PROCID is set but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is")
    master = e.get("MASTER_ADDR") or slurm_hosts(nodelist)[0]
    port = _int(e, "MASTER_PORT") if "MASTER_PORT" in e else SLURM_PORT_BASE + _int(e, "SLURM_JOB_ID", 0) % 10000
    tasks_per_node = e.get("SLURM_STEP_TASKS_PER_NODE") or e.get("SLURM_TASKS_PER_NODE") or "1"
    node_id = _int(e, "SLURM_NODEID", 0)
    return _checked(
        "slurm", _int(e, "SLURM_PROCID"), _int(e, "SLURM_LOCALID", 0), _int(e, "SLURM_STEP_NUM_TASKS"),
        _tasks_on_node(tasks_per_node, node_id), master, port, node,
    )


def _tasks_on_node(spec: str, node_id: int) -> int:
    """SLURM's "2(x3),1" tasks-per-node notation: the count on node ``node_id``."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise UserError(f"cannot parse SLURM tasks per node {spec!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[min(node_id, len(counts) - 1)]


def _checked(launcher: str, rank: int, local_rank: int, world: int, local_world: int,
             addr: str, port: int, node: str) -> LauncherEnv:
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"{launcher}: rank {rank} is outside a world of size {world}")
    if not 0 <= local_rank < max(local_world, 1):
        raise UserError(f"{launcher}: local rank {local_rank} is outside {local_world} local processes")
    if not 0 < port < 65536:
        raise UserError(f"{launcher}: MASTER_PORT {port} is not a TCP port")
    return LauncherEnv(launcher, rank, local_rank, world, local_world, addr, port, node)


def _split_top_level(spec: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    return [item.strip() for item in items if item.strip()]


def _int(e: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = e.get(name)
    if value is None:
        if default is None:
            raise UserError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def _float(e: Mapping[str, str], name: str, default: float) -> float:
    value = e.get(name)
    try:
        return default if value is None else float(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not a number") from None
