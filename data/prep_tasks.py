"""Prep as tasks that a cluster engine runs: the same documents and report as :func:`data.prepare.prepare`.

The inputs (in the single run's order) are dealt to N tasks by size in contiguous runs (:func:`deal`), a
big plain .jsonl file cut between tasks at line starts (a compressed one stays whole), so task order is
document order. Each task screens its part (read, normalise, filter: the stages that look at one
document) and writes, atomically, ``task-NNNNN/`` with ``kept.jsonl`` (the survivors' output lines, PII
already redacted), ``notes.jsonl`` (per survivor: id, the head an example shows, text size, redactions),
``exact.u64`` (exact-dedup keys), ``signatures.u32`` (MinHash signatures) and ``report.json`` (its
tally), then a ``.done`` marker naming its part and its input files' sizes and times: a
finished task is not run again (unless its inputs changed), so a rerun after a failure runs only
the unfinished ones. Dedup then runs as stages across tasks, as datatrove's MinHash does
(signatures → band buckets → duplicate clusters → filter): exact keys merged (first copy kept);
per band, the documents whose band values are shared (``dedup/band-BB.npy``); over all bands,
the streaming rule (a document goes when a bucket of it holds an earlier kept one: see
:func:`data.dedup.greedy_near_duplicates`). Tasks, then bands, run side by side on the executor;
the rest runs in one process: the merge writes ``documents.jsonl`` and one
``report.json`` whose counts and examples are the single run's. Everything lives under
``OUT/tasks/`` (``plan.json`` says what the run is), which the merge removes once it is done.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from data.dedup import ExactDedup, MinHashDedup, exact_key, first_copies, greedy_near_duplicates, shared_buckets
from data.line_ranges import LineRange, split_lines
from data.prepare import (
    DEDUP_BATCH_CHARS,
    EXAMPLE_CHARS,
    PrepSettings,
    Screen,
    Tally,
    build_report,
    document_line,
    no_documents,
    screened,
    write_atomic,
)
from data.readers import expand_inputs, splittable, txt_modes

WORK = "tasks"
PLAN = "plan.json"
DONE = ".done"
DEDUP = "dedup"  # the bucket stage's files
KEPT, EXACT, NEAR = 0, 1, 2  # a screened document's dedup verdict
REASONS = {EXACT: ExactDedup.name, NEAR: MinHashDedup.name}


@dataclass
class PrepPlan:
    """What a task run is: the inputs in order, how many tasks, the settings, and (prep's runs) what each
    task reads: its ``parts``, whole files and line ranges of .jsonl files (:func:`deal`). ``attempt``
    records the latest submission (executor, tasks it ran, start time) for the report."""

    inputs: list[str]
    tasks: int
    settings: dict[str, Any]
    parts: list[list[str | dict[str, Any]]] | None = None
    attempt: dict[str, Any] = field(default_factory=dict)

    def files_of(self, task: int) -> list[str]:
        """The files task ``task`` reads (some of them perhaps in part): without ``parts``, the ``task``-th
        of N contiguous, near-equal runs of files."""
        if self.parts is not None:
            return list(dict.fromkeys(p if isinstance(p, str) else p["path"] for p in self.parts[task]))
        count = len(self.inputs)
        return self.inputs[task * count // self.tasks : (task + 1) * count // self.tasks]

    def sources_of(self, task: int) -> list[str | LineRange]:
        """What task ``task`` reads, in order: files, and line ranges of the .jsonl files split between tasks."""
        if self.parts is None:
            return list(self.files_of(task))
        return [p if isinstance(p, str) else LineRange(**p) for p in self.parts[task]]

    def same_run(self, other: PrepPlan) -> bool:
        return (self.inputs, self.tasks, self.settings) == (other.inputs, other.tasks, other.settings)


def deal(files: list[str], tasks: int) -> list[list[str | dict[str, Any]]]:
    """Prep's inputs dealt to ``tasks`` by size, in order (task order is document order): the t-th task
    takes about the t-th of N equal shares of all the bytes. A plain .jsonl file is cut at the first line
    start of each share inside it (:func:`data.line_ranges.split_lines`); any other file (a compressed
    one cannot be entered in the middle) goes whole to the task its middle byte falls in."""
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    share_starts = [total * t // tasks for t in range(tasks)]
    parts: list[list[str | dict[str, Any]]] = [[] for _ in range(tasks)]

    def task_at(offset: int) -> int:
        return bisect.bisect_right(share_starts, offset) - 1

    offset = 0
    for file, size in zip(files, sizes):
        first, last = bisect.bisect_right(share_starts, offset), bisect.bisect_left(share_starts, offset + size)
        cuts = [start - offset for start in share_starts[first:last]]  # shares that begin inside the file
        pieces = split_lines(file, size, cuts) if cuts and splittable(file) else []
        if len(pieces) > 1:
            for piece in pieces:
                parts[task_at(offset + piece.start)].append(asdict(piece))
        else:
            parts[task_at(offset + size // 2)].append(file)
        offset += size
    return parts


def work_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / WORK


def task_dir(work: Path, task: int) -> Path:
    return work / f"task-{task:05d}"


def load_plan(work: Path) -> PrepPlan:
    path = work / PLAN
    if not path.is_file():
        raise UserError(f"{path} is missing: start the run with `tessera prep|shard ... --out {work.parent}`")
    return PrepPlan(**json.loads(path.read_text()))


def plan_run(inputs: list[str | Path], out_dir: str | Path, tasks: int, settings: PrepSettings,
             executor: str) -> tuple[PrepPlan, list[int]]:
    """Check prep's inputs and settings, then :func:`plan_tasks`."""
    check_tasks(tasks)
    files = [str(p) for p in expand_inputs(inputs)]  # a missing input fails here, before anything is written
    Screen(settings)  # a bad filter name, language or eval file fails here too, not in every task
    plan, pending = plan_tasks(files, out_dir, tasks, asdict(settings), executor, deal(files, tasks))
    shutil.rmtree(work_dir(out_dir) / DEDUP, ignore_errors=True)  # buckets of an earlier attempt: tasks may change
    return plan, pending


def check_tasks(tasks: int) -> None:
    if tasks < 1:
        raise UserError(f"--tasks must be at least 1, got {tasks}")


def plan_tasks(files: list[str], out_dir: str | Path, tasks: int, settings: dict[str, Any], executor: str,
               parts: list[list[str | dict[str, Any]]] | None = None) -> tuple[PrepPlan, list[int]]:
    """Write ``OUT/tasks/plan.json`` for ``files`` dealt to ``tasks`` (any command's task run: prep's,
    shard's; ``parts``: what each task reads, else contiguous runs of files) and return it with the tasks
    still to run. The same plan as the one there (inputs, task count, settings) keeps its finished tasks
    (those whose part is the same); another one starts afresh."""
    plan = PrepPlan(files, tasks, settings, parts)
    work = work_dir(out_dir)
    if (work / PLAN).is_file() and not load_plan(work).same_run(plan):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    pending = [t for t in range(tasks) if not is_done(work, plan, t)]
    plan.attempt = {"executor": executor, "ran": pending, "started": time.time()}
    write_atomic(work / PLAN, json.dumps(asdict(plan), indent=1) + "\n")
    return plan, pending


def is_done(work: Path, plan: PrepPlan, task: int) -> bool:
    marker = task_dir(work, task) / DONE
    try:
        return marker.is_file() and json.loads(marker.read_text()) == _fingerprint(plan, task)
    except FileNotFoundError:  # an input is gone: the task is not done (and will say so when run)
        return False


def plan_of_pending(work: Path, task: int) -> PrepPlan | None:
    """The run's plan when task ``task`` still has to run; None when it is done."""
    plan = load_plan(work)
    if not 0 <= task < plan.tasks:
        raise UserError(f"task {task} is not in this run's 0..{plan.tasks - 1}")
    return None if is_done(work, plan, task) else plan


def run_task(work: Path, task: int) -> None:
    """Screen task ``task``'s files and write its folder; a no-op when it is already done."""
    plan = plan_of_pending(work, task)
    if plan is None:
        return
    settings = PrepSettings(**plan.settings)
    screen, near = Screen(settings), settings.minhash()
    out = task_dir(work, task)
    shutil.rmtree(out, ignore_errors=True)  # what an unfinished attempt left
    out.mkdir(parents=True)
    tally = Tally(settings.examples_per_rule)
    batch: list[str] = []
    batch_chars = 0
    with (open(out / "kept.jsonl.tmp", "w", encoding="utf-8") as kept,
          open(out / "notes.jsonl.tmp", "w", encoding="utf-8") as notes,
          open(out / "exact.u64.tmp", "wb") as keys, open(out / "signatures.u32.tmp", "wb") as signatures):

        def flush() -> None:
            nonlocal batch_chars
            if near is not None and batch:
                signatures.write(near.signatures(batch).astype("<u4").tobytes())
            batch.clear()
            batch_chars = 0

        for doc, verdict in screened(plan.sources_of(task), settings, screen, tally):
            redacted: Counter[str] = Counter()
            line, size = document_line(doc.id, verdict.text, doc.meta, redacted if settings.pii else None)
            kept.write(line)
            notes.write(json.dumps([doc.id, doc.text[:EXAMPLE_CHARS], size, redacted], ensure_ascii=False) + "\n")
            keys.write(exact_key(verdict.text))
            batch.append(verdict.text)
            batch_chars += len(verdict.text)
            if batch_chars >= DEDUP_BATCH_CHARS:
                flush()
        flush()
    for name in ("kept.jsonl", "notes.jsonl", "exact.u64", "signatures.u32"):
        (out / f"{name}.tmp").replace(out / name)
    summary = {"tally": tally.to_json(), "txt_modes": txt_modes(plan.files_of(task), settings.txt_mode),
               "filters": [f.name for f in screen.filters]}
    write_atomic(out / "report.json", json.dumps(summary, ensure_ascii=False) + "\n")
    mark_done(work, plan, task)


def bucket_band(work: Path, band: int) -> None:
    """The bucket stage of one MinHash band, over every task's documents: ``dedup/band-BB.npy``, the
    (position, bucket) of each document whose band values another one shares. Bands are independent:
    an executor runs them side by side."""
    plan = load_plan(work)
    settings = PrepSettings(**plan.settings)
    if not 0 <= band < settings.minhash_bands:
        raise UserError(f"band {band} is not in this run's 0..{settings.minhash_bands - 1}")
    values = _band(work, plan, settings, band)
    (work / DEDUP).mkdir(exist_ok=True)
    _save(_band_file(work, band), shared_buckets(values, np.arange(len(values))))


def bands_of(work: Path) -> list[int]:
    """The MinHash bands whose bucket stage is still to run (none without MinHash)."""
    settings = PrepSettings(**load_plan(work).settings)
    if "minhash" not in settings.dedup:
        return []
    return [b for b in range(settings.minhash_bands) if not _band_file(work, b).is_file()]


def finish(work: Path, out_dir: str | Path) -> dict[str, Any]:
    """Once every task is done: the bucket stage of any band not run yet, exact dedup (first copies of
    the keys), the clusters (:func:`data.dedup.greedy_near_duplicates` over the exact survivors), and
    the merge: writes ``OUT/documents.jsonl`` and ``OUT/report.json``, removes ``OUT/tasks``; returns
    the report."""
    plan = load_plan(work)
    unfinished = [t for t in range(plan.tasks) if not is_done(work, plan, t)]
    if unfinished:
        raise UserError(f"{len(unfinished)} of {plan.tasks} prep tasks are not done (tasks {span(unfinished)}): "
                        "rerun the same command to run them")
    settings = PrepSettings(**plan.settings)
    summaries = [json.loads((task_dir(work, t) / "report.json").read_text()) for t in range(plan.tasks)]
    survivors = np.ones(sum(_kept_count(work, t) for t in range(plan.tasks)), bool)
    if "exact" in settings.dedup:
        survivors = first_copies(np.concatenate([_keys(work, t) for t in range(plan.tasks)]))
    near_dropped = np.zeros(0, np.int64)
    if "minhash" in settings.dedup:
        for band in bands_of(work):
            bucket_band(work, band)
        # an exact duplicate leaves its buckets: MinHash sees only what exact dedup kept, as in one process
        members = [np.load(_band_file(work, b), allow_pickle=False) for b in range(settings.minhash_bands)]
        near_dropped = greedy_near_duplicates([m[survivors[m[:, 0]]] for m in members])
    verdicts = np.where(survivors, KEPT, EXACT).astype(np.int8)
    verdicts[near_dropped] = NEAR
    return _merge(work, plan, settings, summaries, verdicts, Path(out_dir))


def _merge(work: Path, plan: PrepPlan, settings: PrepSettings, summaries: list[dict[str, Any]],
           verdicts: np.ndarray, out: Path) -> dict[str, Any]:
    tally = Tally(settings.examples_per_rule)
    modes: dict[str, str] = {}
    for summary in summaries:
        tally.add(Tally.from_json(summary["tally"]))
        modes.update(summary["txt_modes"])
    inputs = [Path(p) for p in plan.inputs]
    if not tally.seen:
        raise no_documents(inputs, tally)
    partial = out / "documents.jsonl.partial"
    with partial.open("w", encoding="utf-8") as sink:
        for position, (line, note) in enumerate(_kept_lines(work, plan)):
            doc_id, head, size, redacted = json.loads(note)
            if verdicts[position] == KEPT:
                sink.write(line)
                tally.count_kept(size, redacted)
            else:
                tally.note(REASONS[verdicts[position]], doc_id, head)
    partial.replace(out / "documents.jsonl")
    report = build_report(inputs, settings, summaries[0]["filters"], tally, modes,
                          time.time() - plan.attempt["started"])
    ran = plan.attempt["ran"]
    report["executor"] = {"name": plan.attempt["executor"], "tasks": plan.tasks, "ran": ran,
                          "reused": plan.tasks - len(ran)}
    write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(work)
    return report


def _kept_lines(work: Path, plan: PrepPlan) -> Iterator[tuple[str, str]]:
    """Every task's screened documents in order: (output line, [id, head, text bytes, redactions])."""
    for task in range(plan.tasks):
        folder = task_dir(work, task)
        with (open(folder / "kept.jsonl", encoding="utf-8") as kept,
              open(folder / "notes.jsonl", encoding="utf-8") as notes):
            yield from zip(kept, notes, strict=True)


def _kept_count(work: Path, task: int) -> int:
    return (task_dir(work, task) / "exact.u64").stat().st_size // 8


def _keys(work: Path, task: int) -> np.ndarray:
    return np.fromfile(task_dir(work, task) / "exact.u64", dtype="<u8")


def _band_file(work: Path, band: int) -> Path:
    return work / DEDUP / f"band-{band:02d}.npy"


def _band(work: Path, plan: PrepPlan, settings: PrepSettings, band: int) -> np.ndarray:
    """Band ``band`` (``[documents, rows]``) of every task's signatures, in document order."""
    width, rows = settings.minhash_bands * settings.minhash_rows, settings.minhash_rows
    parts = []
    for task in range(plan.tasks):
        path = task_dir(work, task) / "signatures.u32"
        if path.stat().st_size:
            signatures = np.memmap(path, dtype="<u4", mode="r").reshape(-1, width)
            parts.append(np.array(signatures[:, band * rows : (band + 1) * rows]))
    return np.concatenate(parts) if parts else np.zeros((0, rows), "<u4")


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    tmp.replace(path)


def mark_done(work: Path, plan: PrepPlan, task: int) -> None:
    """Task ``task`` finished: its ``.done`` marker, written last."""
    write_atomic(task_dir(work, task) / DONE, json.dumps(_fingerprint(plan, task)) + "\n")


def _fingerprint(plan: PrepPlan, task: int) -> dict[str, Any]:
    """What a finished task's ``.done`` records: its parts (when the plan has them: files change size, and
    so do the shares) and its files' paths, sizes and modification times."""
    return {"parts": plan.parts[task] if plan.parts is not None else None,
            "files": [[f, (s := os.stat(f)).st_size, s.st_mtime_ns] for f in plan.files_of(task)]}


def span(tasks: list[int]) -> str:
    return ", ".join(map(str, tasks[:10])) + (f" and {len(tasks) - 10} more" if len(tasks) > 10 else "")
