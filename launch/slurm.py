"""sbatch scripts for a training run: ``srun torchrun`` (c10d rendezvous on the first node) or one
DeepSpeed launcher per node with a generated hostfile, logs per job, and preemption handling
(``--signal=B:USR1@120`` → the trainer checkpoints → the job requeues itself and resumes); and for
one command per task of a job array (:class:`BatchJob`: prep's tasks), submitted after another job
(``--dependency=afterok:JOB``) and waited for. A run's parallel mesh (:class:`MeshLayout`) is checked
against the nodes and written into the script.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from common.errors import ConfigError, UserError
from launch.env import RDZV_TIMEOUT_VAR, SLURM_PORT_BASE

SIGNAL_LEAD_S = 120  # USR1 this long before the time limit: enough to write a checkpoint
RDZV_TIMEOUT_S = 600  # how long nodes wait for each other at the rendezvous

_TIME = re.compile(r"\d+(-\d+(:\d+){0,2}|(:\d+){0,2})")  # SLURM's M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_MEM = re.compile(r"\d+[KMGT]?")
_NAME = re.compile(r"[\w.,-]+")


class Launcher(enum.StrEnum):
    torchrun = "torchrun"
    deepspeed = "deepspeed"


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """How a run's ranks split over ``parallel.*``. The trainer's meshes are row-major with data parallel
    outermost ((dp, tp), (dp, ep), (dp, pp); here, combined, (dp, pp, ep, cp, tp)) and torchrun numbers a
    node's ranks consecutively, so a dimension's groups are consecutive local ranks of one node when it
    and the dimensions inside it divide the processes per node (tests/distributed/test_mesh_layout.py).
    tp (× cp) must stay inside a node (NVLink); pp, ep and dp may cross nodes."""

    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1

    ORDER = ("pp", "ep", "cp", "tp")  # outer to inner, after dp

    @property
    def model_ranks(self) -> int:
        return self.tp * self.cp * self.pp * self.ep

    def readers(self, world: int) -> int:
        """Ranks reading a batch of their own (those of a tp, cp or pp group share one; ep ranks do not)."""
        return world // (self.tp * self.cp * self.pp)

    def check(self, world: int, per_node: int) -> None:
        inner = self.tp * self.cp
        if per_node % inner:
            what = f"parallel.tp={self.tp}" + (f" × parallel.cp={self.cp}" if self.cp > 1 else "")
            raise ConfigError(f"{what} must divide the {per_node} processes per node: a tensor-parallel group "
                              "stays inside a node (data parallel goes across nodes)")
        if world % self.model_ranks:
            sizes = " × ".join(f"{k}={getattr(self, k)}" for k in self.ORDER if getattr(self, k) > 1)
            raise ConfigError(f"the world size {world} is not divisible by {sizes} = {self.model_ranks}; "
                              "change --nodes or --gpus-per-node")

    def describe(self, world: int, per_node: int) -> str:
        """E.g. ``mesh: dp=4 × tp=8 (tp within a node)``."""
        dims, places, inner = [], [], 1
        for key in reversed(self.ORDER):
            size = getattr(self, key)
            if size > 1:
                inner *= size
                dims.insert(0, f"{key}={size}")
                places.insert(0, f"{key} {'within a node' if per_node % inner == 0 else 'across nodes'}")
        text = " × ".join([f"dp={world // self.model_ranks}", *dims])
        return f"mesh: {text} ({', '.join(places)})" if places else f"mesh: {text}"


@dataclasses.dataclass
class SlurmJob:
    """One training run as a batch job. ``args`` are the entry point's own (--config, overrides)."""

    task: str
    args: list[str]
    nodes: int
    gpus_per_node: int  # 0: CPU nodes, one process each
    log_dir: Path
    workdir: Path
    job_name: str
    launcher: Launcher = Launcher.torchrun
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    master_port: int | None = None  # default: derived from the job id, so jobs sharing a node differ
    python: str = sys.executable
    mesh: MeshLayout = dataclasses.field(default_factory=MeshLayout)

    @property
    def procs_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def validate(self) -> None:
        if self.nodes < 1:
            raise UserError(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise UserError(f"--gpus-per-node must be 0 (CPU) or more, got {self.gpus_per_node}")
        _check_options(self)
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise UserError(f"--master-port {self.master_port} is not a TCP port")
        self.mesh.check(self.world_size, self.procs_per_node)


@dataclasses.dataclass
class BatchJob:
    """One command as a batch job, or run once per task of a job array (``array``: the task numbers,
    which the command reads from SLURM_ARRAY_TASK_ID)."""

    command: list[str]
    job_name: str
    log_dir: Path
    workdir: Path
    array: list[int] | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None

    def validate(self) -> None:
        if self.array is not None and (not self.array or min(self.array) < 0):
            raise UserError(f"a job array needs task numbers of 0 or more, got {self.array}")
        _check_options(self)


def _check_options(job: SlurmJob | BatchJob) -> None:
    """The #SBATCH options both kinds of job share."""
    if job.cpus_per_task is not None and job.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task must be at least 1, got {job.cpus_per_task}")
    if job.time is not None and not _TIME.fullmatch(job.time):
        raise UserError(f"--time {job.time!r} is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)")
    if job.mem is not None and not _MEM.fullmatch(job.mem):
        raise UserError(f"--mem {job.mem!r} is not a SLURM size (e.g. 64G, 500M)")
    for key in ("partition", "account", "qos", "job_name"):
        value = getattr(job, key)
        if value is not None and not _NAME.fullmatch(value):
            raise UserError(f"--{key.replace('_', '-')} {value!r} has characters SLURM does not accept")
    for key in ("log_dir", "workdir"):
        path = str(getattr(job, key))
        if re.search(r"\s", path):
            raise UserError(f"{key.replace('_', ' ')} {path!r} has whitespace, which #SBATCH lines cannot hold")


def _options(job: SlurmJob | BatchJob) -> list[tuple[str, Any]]:
    return [(key.replace("_", "-"), getattr(job, key))
            for key in ("partition", "account", "qos", "time", "cpus_per_task", "mem") if getattr(job, key) is not None]


def _template(name: str) -> Any:
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    return env.from_string(resources.files("launch").joinpath(f"templates/{name}").read_text())


def render_batch(job: BatchJob) -> str:
    """The sbatch script text for ``job``."""
    job.validate()
    return _template("batch.sh.j2").render(
        command_text=shlex.join(job.command), job_name=job.job_name, options=_options(job),
        array=array_spec(job.array) if job.array is not None else None, workdir=job.workdir, log_dir=job.log_dir,
        omp_threads=job.cpus_per_task or 1,
    )


def array_spec(tasks: list[int]) -> str:
    """SLURM's --array value for these task numbers: runs of consecutive ones as ranges (``0-2,5``)."""
    tasks = sorted(set(tasks))
    runs: list[list[int]] = []
    for task in tasks:
        if runs and task == runs[-1][1] + 1:
            runs[-1][1] = task
        else:
            runs.append([task, task])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def render(job: SlurmJob) -> str:
    """The sbatch script text for ``job``."""
    job.validate()
    return _template("sbatch.sh.j2").render(
        task=job.task,
        args_text=shlex.join(job.args),
        job_name=job.job_name,
        nodes=job.nodes,
        gpus_per_node=job.gpus_per_node,
        procs_per_node=job.procs_per_node,
        mesh=job.mesh.describe(job.world_size, job.procs_per_node),
        options=_options(job),
        workdir=job.workdir,
        log_dir=job.log_dir,
        signal_lead_s=SIGNAL_LEAD_S,
        shutdown_timeout_s=SIGNAL_LEAD_S - 30,
        omp_threads=max(1, (job.cpus_per_task or 1) // job.procs_per_node),
        # newer srun no longer inherits the batch's --cpus-per-task: ranks would share one core
        srun_cpus=f" --cpus-per-task={job.cpus_per_task}" if job.cpus_per_task else "",
        rdzv_timeout_var=RDZV_TIMEOUT_VAR,
        rdzv_timeout_s=RDZV_TIMEOUT_S,
        master_port=job.master_port,
        port_base=SLURM_PORT_BASE,
        launcher=job.launcher.value,
        python=shlex.quote(job.python),
    )


def submit(script: Path, after: str | None = None) -> str:
    """``sbatch`` the script; returns the job id. ``after``: a job id that must end well first (every
    task of it, for an array); when it does not, this job is cancelled rather than left pending."""
    if not shutil.which("sbatch"):
        raise UserError("sbatch is not on PATH; run this on a SLURM login node, or drop --submit")
    dependency = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    out = subprocess.run(["sbatch", "--parsable", *dependency, str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines() or [f"exit status {out.returncode}"]
        raise UserError(f"sbatch refused {script}: {lines[-1]}")
    return out.stdout.strip().split(";")[0]


def wait_for(job_ids: list[str], every_s: float = 2.0) -> None:
    """Return once none of these jobs (or their array tasks) is pending or running."""
    while any(map(_queued, job_ids)):
        time.sleep(every_s)


def _queued(job_id: str) -> bool:
    out = subprocess.run(["squeue", "--noheader", "--format=%i", f"--jobs={job_id}"], capture_output=True, text=True)
    if out.returncode and "Invalid job id" in out.stderr:  # it ended and was purged
        return False
    if out.returncode:
        raise UserError(f"squeue failed while waiting for job {job_id}: {out.stderr.strip()}")
    return bool(out.stdout.strip())
