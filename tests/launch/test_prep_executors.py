"""`tessera prep --executor local|ray|slurm --tasks 3` gives the single-process run's documents.jsonl byte
for byte and its report's counts and examples, with duplicates planted across the tasks' files; a
failed task is the only one a rerun runs."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import child_env

from common.errors import UserError
from data.prepare import prepare
from launch import cli
from launch.prep_executors import prep_with_tasks
from tests.data.test_readers import BOILERPLATE, write_page_warc

EXAMPLES = Path(__file__).parents[2] / "examples" / "data"
TESSERA = str(Path(sys.executable).parent / "tessera")
RUN_ONLY = ("seconds", "mb_per_s", "executor")  # what a run's report says about itself, not its documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Seven files (three tasks: files 0-1, 2-3, 4-6) of real text, with exact copies (case and spacing
    changed) and near copies (a few words changed) of documents from other tasks' files, some before
    their original in document order and some after."""
    root = tmp_path_factory.mktemp("prep-corpus") / "in"
    root.mkdir()
    c4 = (EXAMPLES / "pretrain_c4_demo.jsonl").read_text().splitlines()
    for part in range(3):
        (root / f"c4_{part}.jsonl").write_text("\n".join(c4[part * 100 : (part + 1) * 100]) + "\n")
    (root / "stories.txt").write_text("\n\n".join((EXAMPLES / "pretrain_tinystories_valid_head.txt").read_text()
                                                  .split("\n\n")[:300]))
    (root / "wiki.txt").write_text("\n".join((EXAMPLES / "pretrain_wikipedia_demo.txt").read_text()
                                             .splitlines()[:8]) + "\n")
    rng = random.Random(0)
    early = [_copy(json.loads(line)["text"], rng, f"early{i}") for i, line in enumerate(c4[200:260])]
    late = [_copy(json.loads(line)["text"], rng, f"late{i}") for i, line in enumerate(c4[:60])]
    (root / "a_copies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in early))
    late += [{"id": f"contact{i}", "text": f"Write to jane{i}@example.com or call 93.184.216.{i}. " + c4[i][10:]}
             for i in range(3)]
    (root / "z_copies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in late))
    return root


def _copy(text: str, rng: random.Random, name: str) -> dict[str, str]:
    """Every other one an exact copy up to spacing and punctuation, the rest with three words changed."""
    if rng.random() < 0.5:
        return {"id": name, "text": text.replace(" ", "  ", 3).replace(",", " ,", 2)}
    words = text.split(" ")
    for _ in range(3):
        words[rng.randrange(len(words))] = rng.choice(["river", "stone", "lamp"])
    return {"id": name, "text": " ".join(words)}


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> tuple[bytes, dict]:
    out = tmp_path_factory.mktemp("single")
    report = prepare([corpus], out)
    assert report["removed"]["exact_duplicate"] >= 15 and report["removed"]["near_duplicate"] >= 10, report["removed"]
    return (out / "documents.jsonl").read_bytes(), report


def assert_same_run(out: Path, report: dict, single: tuple[bytes, dict]) -> None:
    documents, expected = single
    assert (out / "documents.jsonl").read_bytes() == documents
    assert json.loads((out / "report.json").read_text()) == report
    assert {k: v for k, v in report.items() if k not in RUN_ONLY} == {
        k: v for k, v in expected.items() if k not in RUN_ONLY}
    assert not (out / "tasks").exists()


def test_local_tasks_equal_the_single_process_run(corpus, single, tmp_path):
    report = prep_with_tasks([corpus], tmp_path, executor="local", tasks=3, workers=2)
    assert report["executor"] == {"name": "local", "tasks": 3, "ran": [0, 1, 2], "reused": 0}
    assert_same_run(tmp_path, report, single)


@pytest.mark.parametrize("options", [{"pii": True, "filters": "none"}, {"dedup": "minhash"}])
def test_local_tasks_equal_the_single_process_run_with_other_stages(corpus, tmp_path, options):
    expected = prepare([corpus], tmp_path / "single", **options)
    report = prep_with_tasks([corpus], tmp_path / "tasks", executor="local", tasks=4, workers=2, **options)
    assert_same_run(tmp_path / "tasks", report, ((tmp_path / "single" / "documents.jsonl").read_bytes(), expected))
    if options.get("pii"):
        assert report["pii_redacted"]["email"] >= 3


def test_local_tasks_cut_one_big_jsonl_and_equal_the_single_process_run(corpus, tmp_path):
    """The corpus's .jsonl records as one file (the c4 ones without an id; lines ending in \\n, \\r\\n or a
    blank line), cut into 4 tasks at line starts: the single run's documents byte for byte and its
    report, default ids and duplicates across the cuts included."""
    from data.prep_tasks import deal

    big = tmp_path / "in" / "all.jsonl"
    big.parent.mkdir()
    rng = random.Random(2)
    lines = [line for f in sorted(corpus.glob("*.jsonl")) for line in f.read_text().splitlines()]
    big.write_bytes(b"".join(line.encode() + rng.choice([b"\n", b"\r\n", b"\n\n"]) for line in lines))
    assert [len(task) for task in deal([str(big)], 4)] == [1, 1, 1, 1]
    expected = prepare([big], tmp_path / "single")
    assert expected["removed"]["exact_duplicate"] >= 15 and expected["removed"]["near_duplicate"] >= 10
    report = prep_with_tasks([big], tmp_path / "tasks", executor="local", tasks=4, workers=2)
    assert_same_run(tmp_path / "tasks", report, ((tmp_path / "single" / "documents.jsonl").read_bytes(), expected))
    assert '"id": "all.jsonl:' in (tmp_path / "tasks" / "documents.jsonl").read_text()


def test_local_tasks_with_resiliparse_equal_one_task(tmp_path):
    """Three WARC files of c4 articles in page furniture (some pages repeated in another file, one with a
    few words changed): `tessera prep --extractor resiliparse --executor local --tasks 2` gives `--tasks 1`'s
    documents and report, with resiliparse's text (it keeps the bylines that trafilatura leaves out)."""
    c4 = [json.loads(line)["text"] for line in (EXAMPLES / "pretrain_c4_demo.jsonl").read_text().splitlines()]
    rng = random.Random(1)
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    for part in range(3):
        texts = c4[part * 40 : (part + 1) * 40] + [c4[rng.randrange(40)] for _ in range(4)]
        texts[-1] = _copy(texts[-1], rng, "")["text"]
        write_page_warc(crawl / f"cc-{part}.warc.gz", {
            f"https://site{part}.example/{i}": f"<html><body><nav>{BOILERPLATE}</nav><article><h1>Post {i}</h1>"
            f"<p class='byline'>By Ada Stone</p>{''.join(f'<p>{p}</p>' for p in text.splitlines())}</article>"
            f"<footer>{BOILERPLATE}</footer></body></html>" for i, text in enumerate(texts)})
    for tasks in (1, 2):
        command = ["prep", str(crawl), "--out", str(tmp_path / f"tasks-{tasks}"), "--extractor", "resiliparse",
                   "--executor", "local", "--tasks", str(tasks)]
        assert cli.main(command) == 0
    one = json.loads((tmp_path / "tasks-1" / "report.json").read_text())
    assert one["extractor"] == "resiliparse" and one["documents_in"] == 132 and one["removed"]["exact_duplicate"] >= 4
    documents = (tmp_path / "tasks-1" / "documents.jsonl").read_text()
    assert "By Ada Stone" in documents and "Subscribe" not in documents
    two = json.loads((tmp_path / "tasks-2" / "report.json").read_text())
    assert two["executor"]["tasks"] == 2
    assert_same_run(tmp_path / "tasks-2", two, (documents.encode(), one))


def test_an_unknown_extractor_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prep", str(tmp_path), "--out", str(tmp_path / "out"), "--extractor", "lxml"])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage lines
    assert exit_.value.code == 2 and error.startswith("tessera prep: error: argument --extractor: invalid choice: "
                                                      "'lxml' (choose from ") and "resiliparse" in error, error


def break_middle_file(corpus: Path, tmp_path: Path) -> tuple[Path, object]:
    """A copy of the corpus whose task-1 file has a line that is not JSON at its end; and the repair."""
    broken = tmp_path / "in"
    shutil.copytree(corpus, broken)
    middle = broken / "c4_2.jsonl"  # task 1's second file
    original = middle.read_text()
    middle.write_text(original + "{not json\n")
    return broken, lambda: middle.write_text(original)


def moved(single: tuple[bytes, dict], corpus: Path, to: Path) -> tuple[bytes, dict]:
    """The single run's result as it reads for the corpus copied to ``to`` (the report names paths)."""
    return single[0], json.loads(json.dumps(single[1]).replace(str(corpus), str(to)))


def test_a_failed_task_is_the_only_one_a_rerun_runs(corpus, single, tmp_path):
    broken, restore = break_middle_file(corpus, tmp_path)
    with pytest.raises(UserError, match=r"1 of 3 prep tasks failed \(task 1: .*c4_2.jsonl:101"):
        prep_with_tasks([broken], tmp_path / "out", executor="local", tasks=3, workers=2)
    work = tmp_path / "out" / "tasks"
    assert [(work / f"task-{t:05d}" / ".done").is_file() for t in range(3)] == [True, False, True]
    restore()
    done = run_prep(broken, tmp_path / "out", "--executor", "local")
    assert "3 tasks on local: 1 ran, 2 were done" in done.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["executor"] == {"name": "local", "tasks": 3, "ran": [1], "reused": 2}
    assert_same_run(tmp_path / "out", report, moved(single, corpus, broken))


def run_prep(corpus: Path, out: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([TESSERA, "prep", str(corpus), "--out", str(out), "--tasks", "3", *flags],
                          env=child_env(**env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_ray_tasks_equal_the_single_process_run_also_after_a_failed_task(corpus, single, tmp_path):
    """On a local Ray cluster (one per command): a task that raises is reported in one line, and the
    rerun runs only it."""
    pytest.importorskip("ray")
    broken, restore = break_middle_file(corpus, tmp_path)
    out = tmp_path / "out"
    failed = subprocess.run([TESSERA, "prep", str(broken), "--out", str(out), "--tasks", "3", "--executor", "ray"],
                            env=child_env(), capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "1 of 3 prep tasks failed (task 1: " in failed.stderr and "c4_2.jsonl:101" in failed.stderr
    restore()
    done = run_prep(broken, out, "--executor", "ray")
    assert "3 tasks on ray: 1 ran, 2 were done" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert_same_run(out, report, moved(single, corpus, broken))


def test_a_killed_task_is_redone_and_the_finished_ones_are_not(corpus, single, tmp_path):
    """SIGKILL in the middle of task 1 (as SLURM's array task runs it): no .done, half-written files;
    the rerun runs task 1 alone."""
    from data.prep_tasks import plan_run, run_task
    from data.prepare import PrepSettings

    work = tmp_path / "tasks"
    plan_run([corpus], tmp_path, 3, PrepSettings(), "local")
    for task in (0, 2):
        run_task(work, task)
    stamps = {t: (work / f"task-{t:05d}" / ".done").stat().st_mtime_ns for t in (0, 2)}
    task = subprocess.Popen([sys.executable, "-m", "launch.prep_executors", "task", str(tmp_path)],
                            env=child_env(SLURM_ARRAY_TASK_ID="1"))
    started = work / "task-00001" / "kept.jsonl.tmp"
    while not started.exists() and task.poll() is None:
        time.sleep(0.005)
    task.send_signal(signal.SIGKILL)
    assert task.wait() == -signal.SIGKILL
    assert not (work / "task-00001" / ".done").exists()
    assert {t: (work / f"task-{t:05d}" / ".done").stat().st_mtime_ns for t in (0, 2)} == stamps
    report = prep_with_tasks([corpus], tmp_path, executor="local", tasks=3)
    assert report["executor"]["ran"] == [1]
    assert_same_run(tmp_path, report, single)


@pytest.mark.slow
def test_slurm_job_array_equals_the_single_process_run_also_after_a_failed_task(slurm_cluster, corpus, single,
                                                                                 tmp_path):
    """On the local 2-node SLURM: tasks as `--array`, the merge as an `afterok` job; a task that fails
    cancels the merge, and the rerun submits only that task."""
    broken, restore = break_middle_file(corpus, tmp_path)
    out = tmp_path / "out"
    command = [TESSERA, "prep", str(broken), "--out", str(out), "--executor", "slurm", "--tasks", "3", "--time", "5"]
    failed = subprocess.run(command, env=child_env(**slurm_cluster), capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "submitted task job" in failed.stdout and "(--array=0-2)" in failed.stdout
    assert "1 of 3 prep tasks failed (tasks 1;" in failed.stderr, failed.stderr
    logs = sorted((out / "slurm").glob("tessera-prep-task-*_1.out"))
    assert len(logs) == 1 and "c4_2.jsonl:101" in logs[0].read_text()
    assert not (out / "report.json").exists()

    restore()
    done = subprocess.run(command, env=child_env(**slurm_cluster), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(--array=1)" in done.stdout and "3 tasks on slurm: 1 ran, 2 were done" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["executor"] == {"name": "slurm", "tasks": 3, "ran": [1], "reused": 2}
    assert_same_run(out, report, moved(single, corpus, broken))
    nodes = {line.split(" on ")[1].split()[0] for log in (out / "slurm").glob("*.out")
             for line in log.read_text().splitlines() if line.startswith("tessera: job")}
    assert nodes <= {"n1", "n2"} and nodes, nodes


@pytest.mark.slow
def test_slurm_no_wait_submits_and_the_jobs_finish_the_run(slurm_cluster, corpus, single, tmp_path, monkeypatch):
    from launch.slurm import wait_for

    done = run_prep(corpus, tmp_path, "--executor", "slurm", "--no-wait", **slurm_cluster)
    jobs = re.findall(r"submitted (?:task|band|merge) job (\d+)", done.stdout)
    assert len(jobs) == 3 and not (tmp_path / "report.json").exists(), done.stdout  # it did not wait
    assert "(--array=0-2)" in done.stdout and "(--array=0-13)" in done.stdout  # tasks, then bands
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    wait_for(jobs, every_s=0.5)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["executor"] == {"name": "slurm", "tasks": 3, "ran": [0, 1, 2], "reused": 0}
    assert_same_run(tmp_path, report, single)


@pytest.mark.parametrize(("flags", "message"), [
    (["--no-wait"], "--no-wait is for --executor slurm"),
    (["--executor", "local", "--partition", "cpu"], "--partition is for --executor slurm"),
    (["--executor", "local", "--tasks", "0"], "--tasks must be at least 1"),
])
def test_bad_executor_flags_are_one_line(corpus, tmp_path, capsys, flags, message):
    from launch import cli

    assert cli.main(["prep", str(corpus), "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "tasks").exists()
