"""Sharding's tasks (:mod:`data.shard_tasks`) on an executor (:mod:`launch.executors`): this machine's
processes, a Ray cluster, or a SLURM job array; then the merge in one process.

``python -m launch.shard_executors task OUT`` (the task from ``SLURM_ARRAY_TASK_ID``) and
``python -m launch.shard_executors merge OUT`` are what the SLURM jobs run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from data.prep_tasks import work_dir
from data.shard_tasks import finish, plan_shards, run_task
from data.shards import ShardManifest
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


def shard_with_tasks(inputs: list[str], tokenizer_dir: str | Path, out_dir: str | Path, *,
                     executor: Executor | str = Executor.local, tasks: int = 1, workers: int | None = None,
                     slurm: SlurmOptions | None = None, **settings: Any) -> tuple[ShardManifest | None, list[int]]:
    """Plan the run; on ``executor``, run its unfinished tasks; then the merge. Returns the manifest
    (None when the SLURM jobs were submitted without waiting) and the tasks that ran. ``settings``:
    :func:`data.make_shards.make_shards`' keyword arguments."""
    executor = Executor(executor)
    out = Path(out_dir)
    plan, pending = plan_shards(inputs, tokenizer_dir, out, tasks, executor.value, **settings)
    work = work_dir(out)
    if executor is Executor.slurm:
        return _run_slurm(out.resolve(), pending, slurm or SlurmOptions()), pending
    raise_failures(run_stage(executor, run_task, work, pending, workers), "shard tasks", plan.tasks, work)
    return finish(work, out), pending


def _run_slurm(out: Path, pending: list[int], options: SlurmOptions) -> ShardManifest | None:
    """The unfinished tasks as an array, then the merge as a job after it (``afterok``)."""
    jobs = submit_stages("launch.shard_executors", "shard", out, [("task", pending), ("merge", None)], options)
    if not options.wait:
        return None
    wait_for(list(jobs.values()))
    work = work_dir(out)
    if not work.exists() and (out / "manifest.json").is_file():  # the merge removes the work folder last
        return ShardManifest.load(out)
    raise stage_failure("shard", out, jobs, lambda: "merge")


def main(argv: list[str] | None = None) -> int:
    """The SLURM jobs' entry: one array task, or the merge."""
    return stage_main("launch.shard_executors", "shard", {
        "task": lambda out: run_task(work_dir(out), array_task()),
        "merge": lambda out: finish(work_dir(out), out),
    }, argv)


if __name__ == "__main__":
    sys.exit(main())
