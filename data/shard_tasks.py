"""Sharding as tasks that a cluster engine runs: the single run's shards (:func:`data.make_shards.make_shards`),
tar for tar, byte for byte.

The inputs (in the single run's order) are dealt to N tasks in contiguous runs of files, as prep's are
(:class:`data.prep_tasks.PrepPlan`): a file is the unit, so a document is read exactly as the single
run reads it (its id, ``--txt-mode``'s split, a compressed file). Each task tokenizes its files into
``OUT/tasks/task-NNNNN/`` (tars, index files, a manifest with sha256) and then writes a ``.done``
marker: a rerun runs only the tasks without one. The merge reads every task's shards in order, each
checked against its manifest (sha256, the tar walked, index, token ids), and writes each sample's
arrays and metadata (no tokenizing) through one :class:`data.shards.ShardWriter`, so the packs, shard
boundaries, keys and manifest are the single run's and training sees the same samples in the same
order (the loader's shuffle permutes shards: other boundaries would give another order). Tokenizing is
the work that scales; the merge copies arrays in one process (3% of the single run's CPU time on 5.3M
tokens of 62k documents).
"""

from __future__ import annotations

import inspect
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from common.errors import UserError
from data.make_shards import close_writer, make_shards, shard_writer
from data.prep_tasks import (
    DONE,
    PLAN,
    PrepPlan,
    check_tasks,
    is_done,
    load_plan,
    mark_done,
    plan_of_pending,
    plan_tasks,
    span,
    task_dir,
    work_dir,
)
from data.readers import expand_inputs
from data.shards import INDEX_SUFFIX, KINDS, ShardError, ShardManifest, read_documents
from data.tasks import TASK_KINDS, task_items
from data.tokenizer import load_tokenizer


def plan_shards(inputs: list[str], tokenizer_dir: str | Path, out_dir: str | Path, tasks: int, executor: str,
                **settings: Any) -> tuple[PrepPlan, list[int]]:
    """Check the inputs, tokenizer and output, write ``OUT/tasks/plan.json`` and return it with the
    tasks still to run. ``settings``: :func:`make_shards`' keyword arguments (not ``num_workers``)."""
    check_tasks(tasks)
    defaults = {name: p.default for name, p in inspect.signature(make_shards).parameters.items()
                if p.kind is p.KEYWORD_ONLY and name not in ("num_workers", "allow_empty")}
    if unknown := set(settings) - set(defaults):
        raise TypeError(f"plan_shards() got unknown settings {sorted(unknown)}")
    settings = {**defaults, **settings}
    out = Path(out_dir)
    if (out / "manifest.json").exists() or (any(out.glob("*.tar")) and not (work_dir(out) / PLAN).is_file()):
        raise UserError(f"{out} already holds shards; choose an empty --out directory")
    kind = settings["kind"]
    if kind not in KINDS:
        raise UserError(f"unknown shard kind {kind!r}; choose from {', '.join(KINDS)}")
    if kind in TASK_KINDS:  # files of lines, any name, as the single run reads them
        if missing := [p for p in inputs if not Path(p).is_file()]:
            raise UserError(f"no such file: {missing[0]}")
        files = [str(p) for p in inputs]
    else:
        files = [str(p) for p in expand_inputs(inputs)]  # a missing input fails here, before anything is written
    load_tokenizer(tokenizer_dir)
    if kind == "classification" and settings["labels"] is None:  # every task needs the run's label order
        settings["labels"] = task_items(files, kind)[1]["labels"]
    settings["tokenizer_dir"] = str(Path(tokenizer_dir).resolve())
    return plan_tasks(files, out, tasks, settings, executor)


def run_task(work: Path, task: int) -> None:
    """Tokenize task ``task``'s files into its folder; a no-op when it is already done."""
    plan = plan_of_pending(work, task)
    if plan is None:
        return
    folder = task_dir(work, task)
    shutil.rmtree(folder, ignore_errors=True)  # what an unfinished attempt left
    settings = dict(plan.settings)
    make_shards(plan.files_of(task), settings.pop("tokenizer_dir"), folder, allow_empty=True, **settings)
    mark_done(work, plan, task)


def finish(work: Path, out_dir: str | Path) -> ShardManifest:
    """Once every task is done: every task's samples, in order, into ``OUT``'s shards and manifest (the
    single run's); removes ``OUT/tasks``."""
    plan = load_plan(work)
    unfinished = [t for t in range(plan.tasks) if not is_done(work, plan, t)]
    if unfinished:
        raise UserError(f"{len(unfinished)} of {plan.tasks} shard tasks are not done (tasks {span(unfinished)}): "
                        "rerun the same command to run them")
    out = Path(out_dir)
    for stale in [*out.glob("*.tar"), *out.glob(f"*{INDEX_SUFFIX}")]:  # what a merge that failed wrote
        stale.unlink()
    settings = plan.settings
    tokenizer_dir = settings["tokenizer_dir"]
    extra = {"labels": settings["labels"]} if settings["kind"] == "classification" else {}
    writer = shard_writer(out_dir, load_tokenizer(tokenizer_dir), tokenizer_dir, kind=settings["kind"],
                          shard_bytes=settings["shard_bytes"], append_eos=settings["append_eos"],
                          add_bos=settings["add_bos"], extra=extra)
    skipped: Counter[str] = Counter()
    invalid_utf8: Counter[str] = Counter()
    for task in range(plan.tasks):
        manifest = ShardManifest.load(task_dir(work, task))
        skipped.update(manifest.extra.get("skipped", {}))
        invalid_utf8.update(manifest.extra.get("invalid_utf8_bytes", {}))
        try:
            for info in manifest.shards:
                for arrays, meta in read_documents(manifest, info):
                    writer.write(arrays, meta)
        except ShardError as error:
            (task_dir(work, task) / DONE).unlink()
            raise ShardError(f"{error}: task {task} is marked undone, rerun the same command to redo it") from None
    merged = close_writer(writer, skipped, invalid_utf8)
    shutil.rmtree(work)
    return merged
