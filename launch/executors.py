"""Who runs a command's tasks (prep's, shard's): this machine's processes, a Ray cluster, or SLURM job
arrays. A stage is a function ``(work folder, item)`` that a command's task module defines; here is
how each executor runs one stage over its items, and how a chain of stages becomes SLURM jobs, each
starting when the one before ended well.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common.errors import UserError, exit_status
from launch.slurm import BatchJob, array_spec, render_batch, submit

RAY_LOCAL_STORE_BYTES = 128 << 20
SLURM_ONLY_FLAGS = ("no_wait", "partition", "account", "qos", "time", "mem")

Stage = Callable[[Path, int], None]  # (work folder, task or band)


class Executor(enum.StrEnum):
    local = "local"
    ray = "ray"
    slurm = "slurm"


@dataclasses.dataclass
class SlurmOptions:
    """The SLURM executor's job settings; ``wait``: block until the last job ends."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    mem: str | None = None
    wait: bool = True


def add_executor_flags(parser: argparse.ArgumentParser, executor_help: str, tasks_help: str,
                       no_wait_help: str) -> None:
    """``--executor``, ``--tasks``, ``--no-wait`` and the job options of ``--executor slurm`` (prep and shard
    alike, each with its own help); :func:`check_slurm_flags` refuses the SLURM ones with another executor."""
    parser.add_argument("--executor", choices=[e.value for e in Executor], help=executor_help)
    parser.add_argument("--tasks", type=int, help=tasks_help)
    parser.add_argument("--no-wait", action="store_true", help=no_wait_help)
    for flag in ("--partition", "--account", "--qos"):
        parser.add_argument(flag, help="slurm: the jobs' " + flag[2:])
    parser.add_argument("--time", help="slurm: time limit per task (MM, HH:MM:SS or D-HH:MM:SS)")
    parser.add_argument("--mem", help="slurm: memory per task (e.g. 8G)")


def check_slurm_flags(args: object, executor: str | None) -> None:
    """A SLURM-only command-line flag given without ``--executor slurm``: one line."""
    given = [flag for flag in SLURM_ONLY_FLAGS if getattr(args, flag, None)]
    if given and executor != Executor.slurm:
        raise UserError(f"--{given[0].replace('_', '-')} is for --executor slurm")


def run_local(stage: Stage, work: Path, items: list[int], workers: int) -> dict[int, BaseException]:
    """``stage(work, item)`` for each item in a pool of ``workers`` processes: item → error, for those that failed."""
    if not items:
        return {}
    with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = {item: pool.submit(stage, work, item) for item in items}
        return {item: error for item, future in futures.items() if (error := future.exception()) is not None}


def run_ray(stage: Stage, work: Path, items: list[int]) -> dict[int, BaseException]:
    """``stage(work, item)`` for each item as a Ray task on the cluster at RAY_ADDRESS, or on a local
    one started here (it stops with this process)."""
    try:
        import ray
    except ModuleNotFoundError:
        raise UserError("--executor ray needs ray: pip install 'tessera[ray]'") from None
    if not items:
        return {}
    if not ray.is_initialized():
        local = {} if os.environ.get("RAY_ADDRESS") else {  # "local": never join a cluster found by chance
            "address": "local", "num_cpus": min(len(items), os.cpu_count() or 1),
            "object_store_memory": RAY_LOCAL_STORE_BYTES}  # the stages pass paths, not data: a small store
        try:
            ray.init(include_dashboard=False, log_to_driver=False, **local)
        except (ConnectionError, RuntimeError) as error:
            where = f"at RAY_ADDRESS={os.environ['RAY_ADDRESS']}" if not local else "on this machine"
            raise UserError(f"could not start or reach a Ray cluster {where}: {str(error).splitlines()[0]}") from None
    remote = ray.remote(num_cpus=1, max_retries=0)(stage)
    refs = {item: remote.remote(work, item) for item in items}
    failures: dict[int, BaseException] = {}
    for item, ref in refs.items():
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            failures[item] = error.cause if isinstance(error.cause, BaseException) else error
    return failures


def run_stage(executor: Executor, stage: Stage, work: Path, items: list[int], workers: int | None = None
              ) -> dict[int, BaseException]:
    """One stage on the local or Ray executor (SLURM runs stages as jobs: :func:`submit_stages`)."""
    if executor is Executor.ray:
        return run_ray(stage, work, items)
    return run_local(stage, work, items, workers or os.cpu_count() or 1)


def submit_stages(module: str, command: str, out: Path, stages: list[tuple[str, list[int] | None]],
                  options: SlurmOptions) -> dict[str, str]:
    """Each stage as a job running ``python -m MODULE STAGE OUT`` (an array over its items; None: one
    job), each after the one before (``afterok``: cancelled when one failed); stages without items are
    left out. Scripts and logs go to ``OUT/slurm``. Returns stage → job id."""
    logs = out / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    jobs: dict[str, str] = {}
    for stage, items in stages:
        if items == []:
            continue
        job = BatchJob(command=[sys.executable, "-m", module, stage, str(out)], job_name=f"tessera-{command}-{stage}",
                       array=items, log_dir=logs, workdir=Path.cwd(), partition=options.partition,
                       account=options.account, qos=options.qos, time=options.time, mem=options.mem, cpus_per_task=1)
        script = logs / f"{command}-{stage}.sbatch"
        script.write_text(render_batch(job))
        script.chmod(0o755)
        jobs[stage] = submit(script, after=list(jobs.values())[-1] if jobs else None)
        print(f"submitted {stage} job {jobs[stage]}" + (f" (--array={array_spec(items)})" if items else ""))
    print(f"logs in {logs}")
    return jobs


def raise_failures(failures: dict[int, BaseException], what: str, total: int, work: Path) -> None:
    """Tasks that raised: one line naming the first, and how to run only the failed ones."""
    if not failures:
        return
    first, error = min(failures.items())
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise UserError(f"{len(failures)} of {total} {what} failed ({what.split()[-1][:-1]} {first}: {message}); the "
                    f"finished ones are kept in {work}: fix the cause and rerun the same command to run "
                    "only the others")


def array_task() -> int:
    """This SLURM array task's number: the task or band a job of :func:`submit_stages` runs."""
    return int(os.environ["SLURM_ARRAY_TASK_ID"])


def stage_main(module: str, command: str, stages: dict[str, Callable[[Path], object]], argv: list[str] | None) -> int:
    """What a job of :func:`submit_stages` runs, ``python -m MODULE STAGE OUT``: ``stages[STAGE](OUT)``; a
    user error is one line and status 2, the CLI's rule."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("stage", choices=list(stages))
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)

    def run() -> None:  # a stage's own result (the merge's report) is not a status
        stages[args.stage](args.out)

    return exit_status(f"tessera {command}", run)


def stage_failure(command: str, out: Path, jobs: dict[str, str], later: Callable[[], str]) -> UserError:
    """Why waited-for jobs of :func:`submit_stages` left no result: the tasks that did not finish (a rerun
    runs only those), else the failed later stage that ``later()`` names."""
    from data.prep_tasks import is_done, load_plan, span, work_dir

    work, logs = work_dir(out), out / "slurm"
    plan = load_plan(work)
    unfinished = [t for t in range(plan.tasks) if not is_done(work, plan, t)]
    if unfinished:
        return UserError(f"{len(unfinished)} of {plan.tasks} {command} tasks failed (tasks {span(unfinished)}; logs: "
                         f"{logs}/tessera-{command}-task-{jobs['task']}_*.out): fix the cause and rerun the same "
                         "command to run only those")
    stage = later()
    return UserError(f"the {stage} job {jobs[stage]} failed: see {logs}/tessera-{command}-{stage}-{jobs[stage]}*.out")
