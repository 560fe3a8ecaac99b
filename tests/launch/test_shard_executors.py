"""`tessera shard --executor local|ray|slurm --tasks 3` writes the single-process run's shards, tar for tar and
byte for byte (so the loader yields the same samples in the same order), with shard boundaries that
cross the tasks' files; a failed task is the only one a rerun runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launching import child_env

from common.errors import UserError
from data.make_shards import make_shards
from launch.shard_executors import shard_with_tasks

EXAMPLES = Path(__file__).parents[2] / "examples" / "data"
TESSERA = str(Path(sys.executable).parent / "tessera")
SETTINGS = {"shard_bytes": 24 << 10, "append_eos": True, "metadata": True}  # ~8 shards over 7 files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Seven files (three tasks: files 0-1, 2-3, 4-6) of real documents, one .txt among the .jsonl, one
    with a byte that is not UTF-8."""
    root = tmp_path_factory.mktemp("shard-corpus") / "in"
    root.mkdir()
    c4 = (EXAMPLES / "pretrain_c4_demo.jsonl").read_text().splitlines()
    for part in range(6):
        (root / f"c4_{part}.jsonl").write_text("\n".join(c4[part * 40 : (part + 1) * 40]) + "\n")
    (root / "c4_3.jsonl").write_bytes((root / "c4_3.jsonl").read_bytes().replace(b"the ", b"the \xff", 1))
    (root / "stories.txt").write_text("\n\n".join((EXAMPLES / "pretrain_tinystories_valid_head.txt").read_text()
                                                  .split("\n\n")[:60]))
    return root


@pytest.fixture(scope="module")
def tokenizer(shards) -> Path:
    return shards.parent / "tokenizer"


@pytest.fixture(scope="module")
def single(corpus, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    manifest, _ = make_shards([str(corpus)], tokenizer, out, num_workers=1, **SETTINGS)
    assert len(manifest.shards) >= 6 and manifest.extra["invalid_utf8_bytes"], manifest.extra
    return out


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def training_samples(directory: Path) -> tuple[str, list[bytes]]:
    """What training reads: the data's fingerprint and epoch 0's samples in the loader's shuffled order."""
    from data.epoch_plan import epoch_order
    from data.shard_set import ShardSet, Source

    shards = ShardSet([Source(str(directory))])
    return shards.fingerprint(), [shards.read(int(i)).tobytes() for i in epoch_order(shards, seed=3, epoch=0)]


def assert_same_shards(out: Path, single: Path) -> None:
    assert files_of(out) == files_of(single)  # tars, index files, manifest.json
    assert not (out / "tasks").exists()
    assert training_samples(out) == training_samples(single)


def test_local_tasks_equal_the_single_process_run(corpus, tokenizer, single, tmp_path):
    manifest, ran = shard_with_tasks([str(corpus)], tokenizer, tmp_path, executor="local", tasks=3, workers=2,
                                     **SETTINGS)
    assert ran == [0, 1, 2] and manifest.num_samples == json.loads((single / "manifest.json").read_text())[
        "num_samples"]
    assert_same_shards(tmp_path, single)


def test_more_tasks_than_files_leave_some_empty(corpus, tokenizer, tmp_path):
    files = [str(corpus / "c4_0.jsonl"), str(corpus / "stories.txt")]
    make_shards(files, tokenizer, tmp_path / "single", num_workers=1, **SETTINGS)
    shard_with_tasks(files, tokenizer, tmp_path / "tasks", executor="local", tasks=3, workers=2, **SETTINGS)
    assert_same_shards(tmp_path / "tasks", tmp_path / "single")


def test_classification_tasks_share_the_run_s_label_order(tokenizer, tmp_path):
    """Each file holds other labels: a task alone would number them otherwise."""
    files = []
    for i, labels in enumerate((["spam"], ["ham", "spam"], ["eggs"])):
        path = tmp_path / f"part{i}.tsv"
        path.write_text("".join(f"{label}\tmessage {i} {n} for {label}\n" for n in range(5) for label in labels))
        files.append(str(path))
    settings = {"kind": "classification", "shard_bytes": 4096}
    single = make_shards(files, tokenizer, tmp_path / "single", num_workers=1, **settings)[0]
    assert single.extra["labels"] == ["eggs", "ham", "spam"]
    shard_with_tasks(files, tokenizer, tmp_path / "tasks", executor="local", tasks=3, workers=2, **settings)
    assert_same_shards(tmp_path / "tasks", tmp_path / "single")


def test_a_damaged_task_shard_stops_the_merge_and_only_its_task_is_redone(corpus, tokenizer, single, tmp_path):
    """A task's tar changed after its task finished (disk, a stray writer): the merge checks it against
    the task's manifest, names it in one line and writes no manifest; the rerun redoes that task alone
    and replaces what the failed merge wrote."""
    from data.shard_tasks import finish, plan_shards, run_task

    _, pending = plan_shards([str(corpus)], tokenizer, tmp_path, 3, "local", **SETTINGS)
    work = tmp_path / "tasks"
    for task in pending:
        run_task(work, task)
    tar = sorted((work / "task-00001").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[2000] ^= 1
    tar.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"shard {tar} does not match its sha256.*task 1 is marked undone"):
        finish(work, tmp_path)
    assert not (tmp_path / "manifest.json").exists() and any(tmp_path.glob("*.tar"))  # task 0's, copied
    _, ran = shard_with_tasks([str(corpus)], tokenizer, tmp_path, executor="local", tasks=3, **SETTINGS)
    assert ran == [1]
    assert_same_shards(tmp_path, single)


def break_middle_file(corpus: Path, tmp_path: Path) -> tuple[Path, object]:
    """A copy of the corpus whose task-1 file has a line that is not JSON at its end; and the repair."""
    broken = tmp_path / "in"
    broken.mkdir()
    for path in corpus.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    middle = broken / "c4_2.jsonl"  # task 1's first file
    original = middle.read_bytes()
    middle.write_bytes(original + b"{not json\n")
    return broken, lambda: middle.write_bytes(original)


def moved(single: Path, corpus: Path, to: Path, tmp_path: Path) -> Path:
    """The single run's shards as they read for the corpus copied to ``to`` (the manifest names files)."""
    copy = tmp_path / "expected"
    copy.mkdir()
    for name, data in files_of(single).items():
        (copy / name).write_bytes(data.replace(str(corpus).encode(), str(to).encode()) if name.endswith(".json")
                                  else data)
    return copy


def run_shard(corpus: Path, tokenizer: Path, out: Path, *flags: str, check: bool = True,
              **env: str) -> subprocess.CompletedProcess:
    command = [TESSERA, "shard", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out), "--tasks", "3",
               "--shard-size", str(SETTINGS["shard_bytes"]), "--append-eos", "--metadata", *flags]
    done = subprocess.run(command, env=child_env(**env), capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_a_failed_task_is_the_only_one_a_rerun_runs(corpus, tokenizer, single, tmp_path):
    broken, restore = break_middle_file(corpus, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"1 of 3 shard tasks failed \(task 1: .*c4_2.jsonl:41"):
        shard_with_tasks([str(broken)], tokenizer, out, executor="local", tasks=3, workers=2, **SETTINGS)
    work = out / "tasks"
    assert [(work / f"task-{t:05d}" / ".done").is_file() for t in range(3)] == [True, False, True]
    assert not (out / "manifest.json").exists()
    restore()
    done = run_shard(broken, tokenizer, out, "--executor", "local")
    assert "3 tasks on local: 1 ran, 2 were done" in done.stdout, done.stdout
    assert_same_shards(out, moved(single, corpus, broken, tmp_path))


@pytest.mark.slow
def test_ray_tasks_equal_the_single_process_run_also_after_a_failed_task(corpus, tokenizer, single, tmp_path):
    """On a local Ray cluster (one per command): a task that raises is reported in one line, and the
    rerun runs only it."""
    pytest.importorskip("ray")
    broken, restore = break_middle_file(corpus, tmp_path)
    out = tmp_path / "out"
    failed = run_shard(broken, tokenizer, out, "--executor", "ray", check=False)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "1 of 3 shard tasks failed (task 1: " in failed.stderr and "c4_2.jsonl:41" in failed.stderr
    restore()
    done = run_shard(broken, tokenizer, out, "--executor", "ray")
    assert "3 tasks on ray: 1 ran, 2 were done" in done.stdout
    assert_same_shards(out, moved(single, corpus, broken, tmp_path))


@pytest.mark.slow
def test_slurm_job_array_equals_the_single_process_run_also_after_a_failed_task(slurm_cluster, corpus, tokenizer,
                                                                                single, tmp_path):
    """On the local 2-node SLURM: tasks as `--array`, the merge as an `afterok` job; a task that fails
    cancels the merge, and the rerun submits only that task."""
    broken, restore = break_middle_file(corpus, tmp_path)
    out = tmp_path / "out"
    failed = run_shard(broken, tokenizer, out, "--executor", "slurm", "--time", "5", check=False, **slurm_cluster)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "submitted task job" in failed.stdout and "(--array=0-2)" in failed.stdout
    assert "1 of 3 shard tasks failed (tasks 1;" in failed.stderr, failed.stderr
    logs = sorted((out / "slurm").glob("tessera-shard-task-*_1.out"))
    assert len(logs) == 1 and "c4_2.jsonl:41" in logs[0].read_text()
    assert not (out / "manifest.json").exists()

    restore()
    done = run_shard(broken, tokenizer, out, "--executor", "slurm", "--time", "5", **slurm_cluster)
    assert "(--array=1)" in done.stdout and "3 tasks on slurm: 1 ran, 2 were done" in done.stdout
    (out / "slurm").rename(tmp_path / "logs")  # scripts and logs are not shards
    assert_same_shards(out, moved(single, corpus, broken, tmp_path))
    nodes = {line.split(" on ")[1].split()[0] for log in (tmp_path / "logs").glob("*.out")
             for line in log.read_text().splitlines() if line.startswith("tessera: job")}
    assert nodes <= {"n1", "n2"} and nodes, nodes


@pytest.mark.slow
def test_slurm_no_wait_submits_and_the_jobs_finish_the_run(slurm_cluster, corpus, tokenizer, single, tmp_path,
                                                           monkeypatch):
    from launch.slurm import wait_for

    out = tmp_path / "out"
    done = run_shard(corpus, tokenizer, out, "--executor", "slurm", "--no-wait", **slurm_cluster)
    jobs = re.findall(r"submitted (?:task|merge) job (\d+)", done.stdout)
    assert len(jobs) == 2 and "(--array=0-2)" in done.stdout and not (out / "manifest.json").exists(), done.stdout
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    wait_for(jobs, every_s=0.5)
    (out / "slurm").rename(tmp_path / "logs")
    assert_same_shards(out, single)


@pytest.mark.parametrize(("flags", "message"), [
    (["--no-wait"], "--no-wait is for --executor slurm"),
    (["--executor", "local", "--partition", "cpu"], "--partition is for --executor slurm"),
    (["--executor", "ray", "--time", "5"], "--time is for --executor slurm"),
    (["--executor", "local", "--tasks", "0"], "--tasks must be at least 1"),
])
def test_bad_executor_flags_are_one_line(corpus, tokenizer, tmp_path, capsys, flags, message):
    from launch import cli

    assert cli.main(["shard", str(corpus), "--tokenizer", str(tokenizer), "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "tasks").exists()
