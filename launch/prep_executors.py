"""Prep's stages (:mod:`data.prep_tasks`) on an executor (:mod:`launch.executors`): this machine's
processes, a Ray cluster, or SLURM job arrays. Each runs the same functions: the tasks not yet done,
then the bucket stage of each MinHash band, then the clusters and merge in one process.

``python -m launch.prep_executors task|band OUT`` (the task or band from ``SLURM_ARRAY_TASK_ID``) and
``python -m launch.prep_executors merge OUT`` are what the SLURM jobs run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from data.prep_tasks import bands_of, bucket_band, finish, plan_run, run_task, work_dir
from data.prepare import PrepSettings
from launch.executors import (
    Executor,
    SlurmOptions,
    array_task,
    raise_failures,
    run_stage,
    stage_failure,
    stage_main,
    submit_stages,
)
from launch.slurm import wait_for


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
        return _run_slurm(out, pending, slurm or SlurmOptions())
    raise_failures(run_stage(executor, run_task, work, pending, workers), "prep tasks", plan.tasks, work)
    bands = bands_of(work)
    raise_failures(run_stage(executor, bucket_band, work, bands, workers), "MinHash bands", len(bands), work)
    return finish(work, out)


def _run_slurm(out: Path, pending: list[int], options: SlurmOptions) -> dict[str, Any] | None:
    """Three jobs, each starting when the one before ended well (``afterok``; cancelled otherwise): the
    unfinished tasks as an array, the bands' bucket stage as an array, then the clusters and merge.
    Every stage runs on the cluster, not on the submitting (login) node, and needs nobody to wait:
    ``--no-wait`` returns after submitting."""
    out = out.resolve()
    work = work_dir(out)
    jobs = submit_stages("launch.prep_executors", "prep", out,
                         [("task", pending), ("band", bands_of(work)), ("merge", None)], options)
    if not options.wait:
        return None
    wait_for(list(jobs.values()))
    if not work.exists() and (out / "report.json").is_file():  # the merge removes the work folder last
        return json.loads((out / "report.json").read_text())
    raise stage_failure("prep", out, jobs, lambda: "band" if "band" in jobs and bands_of(work) else "merge")


def main(argv: list[str] | None = None) -> int:
    """The SLURM jobs' entry: one array task or band, or the clusters and merge."""
    return stage_main("launch.prep_executors", "prep", {
        "task": lambda out: run_task(work_dir(out), array_task()),
        "band": lambda out: bucket_band(work_dir(out), array_task()),
        "merge": lambda out: finish(work_dir(out), out),
    }, argv)


if __name__ == "__main__":
    sys.exit(main())
