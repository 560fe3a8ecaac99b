"""Sharding's tasks (:mod:`data.shard_tasks`) on an executor (:mod:`launch.executors`): this machine's
processes, a Ray cluster, or a SLURM job array; then the merge in one process.

``python -m launch.shard_executors task OUT`` (the task from ``SLURM_ARRAY_TASK_ID``) and
``python -m launch.shard_executors merge OUT`` are what the SLURM jobs run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import UserError, exit_status
from data.prep_tasks import is_done, load_plan, span, work_dir
from data.shard_tasks import finish, plan_shards, run_task
from data.shards import ShardManifest
from launch.executors import Executor, SlurmOptions, raise_failures, run_stage, submit_stages
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
    work, logs = work_dir(out), out / "slurm"
    if not work.exists() and (out / "manifest.json").is_file():  # the merge removes the work folder last
        return ShardManifest.load(out)
    plan = load_plan(work)
    unfinished = [t for t in range(plan.tasks) if not is_done(work, plan, t)]
    if unfinished:
        raise UserError(f"{len(unfinished)} of {plan.tasks} shard tasks failed (tasks {span(unfinished)}; logs: "
                        f"{logs}/tessera-shard-task-{jobs['task']}_*.out): fix the cause and rerun the same command "
                        "to run only those")
    raise UserError(f"the merge job {jobs['merge']} failed: see {logs}/tessera-shard-merge-{jobs['merge']}*.out")


def main(argv: list[str] | None = None) -> int:
    """The SLURM jobs' entry: one array task, or the merge."""
    parser = argparse.ArgumentParser(prog="python -m launch.shard_executors")
    parser.add_argument("stage", choices=["task", "merge"])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    work = work_dir(args.out)
    stages: dict[str, Callable[[], Any]] = {
        "task": lambda: run_task(work, int(os.environ["SLURM_ARRAY_TASK_ID"])),
        "merge": lambda: finish(work, args.out),
    }

    def run_stage() -> None:  # a stage's own result (the merge's report) is not a status
        stages[args.stage]()

    return exit_status("tessera shard", run_stage)


if __name__ == "__main__":
    sys.exit(main())
