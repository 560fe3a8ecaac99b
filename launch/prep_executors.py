"""Who runs prep's stages (:mod:`data.prep_tasks`): this machine's processes, a Ray cluster, or SLURM
job arrays. Each runs the same functions: the tasks not yet done, then the bucket stage of each
MinHash band, then the clusters and merge in one process.

``python -m launch.prep_executors task|band OUT`` (the task or band from ``SLURM_ARRAY_TASK_ID``) and
``python -m launch.prep_executors merge OUT`` are what the SLURM jobs run.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from common.errors import UserError
from data.prep_tasks import bands_of, bucket_band, finish, is_done, load_plan, plan_run, run_task, work_dir
from data.prep_tasks import span as _span
from data.prepare import PrepSettings
from launch.slurm import BatchJob, array_spec, render_batch, submit, wait_for

RAY_LOCAL_STORE_BYTES = 128 << 20


Stage = Callable[[Path, int], None]  # run_task or bucket_band: (work folder, task or band)


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
    """Plan the run; on ``executor``, run its unfinished tasks, then the MinHash bucket stage of each
    band; then the clusters and the merge. Returns the report (None when the SLURM jobs were submitted
    without waiting). ``options`` are PrepSettings' fields."""
    executor = Executor(executor)
    out = Path(out_dir)
    plan, pending = plan_run(inputs, out, tasks, PrepSettings(**options), executor.value)
    work = work_dir(out)
    if executor is Executor.slurm:
        return _run_slurm(out, pending, plan.tasks, slurm or SlurmOptions())
    run = _run_ray if executor is Executor.ray else functools.partial(_run_local,
                                                                      workers=workers or os.cpu_count() or 1)
    _raise_failures(run(run_task, work, pending), "prep tasks", plan.tasks, out)
    bands = bands_of(work)
    _raise_failures(run(bucket_band, work, bands), "MinHash bands", len(bands), out)
    return finish(work, out)


def _run_local(stage: Stage, work: Path, items: list[int], workers: int) -> dict[int, BaseException]:
    """``stage(work, item)`` for each item in a pool of ``workers`` processes: item → error, for those that failed."""
    if not items:
        return {}
    with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = {item: pool.submit(stage, work, item) for item in items}
        return {item: error for item, future in futures.items() if (error := future.exception()) is not None}


def _run_ray(stage: Stage, work: Path, items: list[int]) -> dict[int, BaseException]:
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


def _run_slurm(out: Path, pending: list[int], tasks: int, options: SlurmOptions) -> dict[str, Any] | None:
    """Three jobs, each starting when the one before ended well (``afterok``; cancelled otherwise): the
    unfinished tasks as an array, the bands' bucket stage as an array, then the clusters and merge.
    Every stage runs on the cluster, not on the submitting (login) node, and needs nobody to wait:
    ``--no-wait`` returns after submitting."""
    out = out.resolve()
    work = work_dir(out)
    logs = out / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    common = dict(log_dir=logs, workdir=Path.cwd(), partition=options.partition, account=options.account,
                  qos=options.qos, time=options.time, mem=options.mem, cpus_per_task=1)
    jobs: dict[str, str] = {}
    for stage, items in (("task", pending), ("band", bands_of(work)), ("merge", None)):
        if items == []:
            continue
        job = BatchJob(command=[sys.executable, "-m", "launch.prep_executors", stage, str(out)],
                       job_name=f"tessera-prep-{stage}", array=items, **common)
        after = list(jobs.values())[-1] if jobs else None
        jobs[stage] = submit(_write_script(logs / f"prep-{stage}.sbatch", render_batch(job)), after=after)
        print(f"submitted {stage} job {jobs[stage]}" + (f" (--array={array_spec(items)})" if items else ""))
    print(f"logs in {logs}")
    if not options.wait:
        return None
    wait_for(list(jobs.values()))
    if not work.exists() and (out / "report.json").is_file():  # the merge removes the work folder last
        return json.loads((out / "report.json").read_text())
    plan = load_plan(work)
    unfinished = [t for t in range(plan.tasks) if not is_done(work, plan, t)]
    if unfinished:
        raise UserError(f"{len(unfinished)} of {tasks} prep tasks failed (tasks {_span(unfinished)}; logs: "
                        f"{logs}/tessera-prep-task-{jobs['task']}_*.out): fix the cause and rerun the same command "
                        "to run only those")
    failed = "band" if "band" in jobs and bands_of(work) else "merge"
    raise UserError(f"the {failed} job {jobs[failed]} failed: see {logs}/tessera-prep-{failed}-{jobs[failed]}*.out")


def _write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _raise_failures(failures: dict[int, BaseException], what: str, total: int, out: Path) -> None:
    if not failures:
        return
    first, error = min(failures.items())
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise UserError(f"{len(failures)} of {total} {what} failed ({what.split()[-1][:-1]} {first}: {message}); the "
                    f"finished ones are kept in {work_dir(out)}: fix the cause and rerun the same command to run "
                    "only the others")


def main(argv: list[str] | None = None) -> int:
    """The SLURM jobs' entry: one array task, or the stages across tasks."""
    parser = argparse.ArgumentParser(prog="python -m launch.prep_executors")
    parser.add_argument("stage", choices=["task", "band", "merge"])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    work = work_dir(args.out)
    stages: dict[str, Callable[[], Any]] = {
        "task": lambda: run_task(work, int(os.environ["SLURM_ARRAY_TASK_ID"])),
        "band": lambda: bucket_band(work, int(os.environ["SLURM_ARRAY_TASK_ID"])),
        "merge": lambda: finish(work, args.out),
    }
    stage = stages[args.stage]
    try:
        stage()
    except UserError as error:
        print(f"tessera prep: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
