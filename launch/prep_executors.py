"""Who runs prep's tasks (:mod:`data.prep_tasks`): this machine's processes, a Ray cluster, or a SLURM
job array. Each runs the same task function on the tasks not yet done, then the stages across tasks.

``python -m launch.prep_executors task OUT`` (the task number from ``SLURM_ARRAY_TASK_ID``) and
``python -m launch.prep_executors finish OUT`` are what the SLURM jobs run.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from common.errors import UserError
from data.prep_tasks import finish, is_done, load_plan, plan_run, run_task, work_dir
from data.prep_tasks import span as _span
from data.prepare import PrepSettings
from launch.slurm import BatchJob, array_spec, render_batch, submit, wait_for

RAY_LOCAL_STORE_BYTES = 128 << 20


class Executor(enum.StrEnum):
    local = "local"
    ray = "ray"
    slurm = "slurm"


@dataclasses.dataclass
class SlurmOptions:
    """The SLURM executor's job settings; ``wait``: block until the merge job ends."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    mem: str | None = None
    wait: bool = True


def prep_with_tasks(inputs: list[str], out_dir: str | Path, *, executor: Executor | str = Executor.local,
                    tasks: int = 1, workers: int | None = None, slurm: SlurmOptions | None = None,
                    **options: Any) -> dict[str, Any] | None:
    """Plan the run, run its unfinished tasks on ``executor``, then dedup and merge; returns the report
    (None when the SLURM jobs were submitted without waiting). ``options`` are PrepSettings' fields."""
    executor = Executor(executor)
    out = Path(out_dir)
    plan, pending = plan_run(inputs, out, tasks, PrepSettings(**options), executor.value)
    work = work_dir(out)
    if executor is Executor.local:
        _raise_failures(_run_local(work, pending, workers or os.cpu_count() or 1), plan.tasks, out)
    elif executor is Executor.ray:
        _raise_failures(_run_ray(work, pending), plan.tasks, out)
    else:
        return _run_slurm(out, pending, plan.tasks, slurm or SlurmOptions())
    return finish(work, out)


def _run_local(work: Path, pending: list[int], workers: int) -> dict[int, BaseException]:
    """Each task in a process of a pool of ``workers``: task → its error, for those that failed."""
    if not pending:
        return {}
    with ProcessPoolExecutor(max_workers=min(workers, len(pending))) as pool:
        futures = {task: pool.submit(run_task, work, task) for task in pending}
        return {task: error for task, future in futures.items() if (error := future.exception()) is not None}


def _run_ray(work: Path, pending: list[int]) -> dict[int, BaseException]:
    """Each task as a Ray task on the cluster at RAY_ADDRESS, or on a local one this call starts."""
    try:
        import ray
    except ModuleNotFoundError:
        raise UserError("--executor ray needs ray: pip install 'tessera[ray]'") from None
    if not pending:
        return {}
    if not ray.is_initialized():
        local = {} if os.environ.get("RAY_ADDRESS") else {  # "local": never join a cluster found by chance
            "address": "local", "num_cpus": min(len(pending), os.cpu_count() or 1),
            "object_store_memory": RAY_LOCAL_STORE_BYTES}  # the tasks pass paths, not data: a small store
        ray.init(include_dashboard=False, log_to_driver=False, **local)
    remote = ray.remote(num_cpus=1, max_retries=0)(run_task)
    refs = {task: remote.remote(work, task) for task in pending}
    failures: dict[int, BaseException] = {}
    for task, ref in refs.items():
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            failures[task] = error.cause if isinstance(error.cause, BaseException) else error
    return failures


def _run_slurm(out: Path, pending: list[int], tasks: int, options: SlurmOptions) -> dict[str, Any] | None:
    """The unfinished tasks as a job array, then the stages across tasks as a job that starts when every
    task ended well (``afterok``; cancelled otherwise). The merge runs on the cluster, not on the
    submitting (login) node, and without it waiting: ``--no-wait`` returns after submitting."""
    out = out.resolve()
    logs = out / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    common = dict(log_dir=logs, workdir=Path.cwd(), partition=options.partition, account=options.account,
                  qos=options.qos, time=options.time, mem=options.mem, cpus_per_task=1)
    stage = [sys.executable, "-m", "launch.prep_executors"]
    jobs = []
    if pending:
        array = BatchJob(command=[*stage, "task", str(out)], job_name="tessera-prep-task", array=pending, **common)
        jobs.append(submit(_write_script(logs / "prep-task.sbatch", render_batch(array))))
        print(f"submitted task array {jobs[0]} (--array={array_spec(pending)})")
    merge = BatchJob(command=[*stage, "finish", str(out)], job_name="tessera-prep-merge", **common)
    merge_script = _write_script(logs / "prep-merge.sbatch", render_batch(merge))
    jobs.append(submit(merge_script, after=jobs[0] if pending else None))
    print(f"submitted merge job {jobs[-1]}; logs in {logs}")
    if not options.wait:
        return None
    wait_for(jobs)
    work = work_dir(out)
    if not work.exists() and (out / "report.json").is_file():  # the merge removes the work folder last
        return json.loads((out / "report.json").read_text())
    plan = load_plan(work)
    unfinished = [t for t in range(plan.tasks) if not is_done(work, plan, t)]
    if unfinished:
        raise UserError(f"{len(unfinished)} of {tasks} prep tasks failed (tasks {_span(unfinished)}; logs: "
                        f"{logs}/tessera-prep-task-{jobs[0]}_*.out): fix the cause and rerun the same command to run "
                        "only those")
    raise UserError(f"the merge job {jobs[-1]} failed: see {logs}/tessera-prep-merge-{jobs[-1]}.out")


def _write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _raise_failures(failures: dict[int, BaseException], tasks: int, out: Path) -> None:
    if not failures:
        return
    first, error = min(failures.items())
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise UserError(f"{len(failures)} of {tasks} prep tasks failed (task {first}: {message}); the finished ones are "
                    f"kept in {work_dir(out)}: fix the cause and rerun the same command to run only the others")


def main(argv: list[str] | None = None) -> int:
    """The SLURM jobs' entry: one array task, or the stages across tasks."""
    parser = argparse.ArgumentParser(prog="python -m launch.prep_executors")
    parser.add_argument("stage", choices=["task", "finish"])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    stage: Callable[[], Any]
    if args.stage == "task":
        stage = lambda: run_task(work_dir(args.out), int(os.environ["SLURM_ARRAY_TASK_ID"]))  # noqa: E731
    else:
        stage = lambda: finish(work_dir(args.out), args.out)  # noqa: E731
    try:
        stage()
    except UserError as error:
        print(f"tessera prep: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
