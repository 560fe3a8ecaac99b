"""What `tessera slurm` renders, run on a real local SLURM (two slurmd: n1, n2): to completion, and
through a preemption (USR1 → checkpoint → requeue → resume) to the same final loss, with srun
torchrun and with one deepspeed launcher per node."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import assert_same_curve, check_run, child_env, losses, write_config

pytestmark = pytest.mark.slow
TESSERA = str(Path(sys.executable).parent / "tessera")
MAX_STEPS = 150  # long enough that a signal sent after the first logged step lands mid-run
JOB_TIMEOUT_S = 300


def render(tmp_path: Path, shards: Path, slurm_cluster: dict[str, str], name: str, *flags: str,
           strategy: str = "ddp") -> tuple[Path, str]:
    """`tessera slurm` for 2 nodes × 1 process of the tiny run; returns the run directory and stdout."""
    cfg = write_config(tmp_path / f"{name}.yaml", shards, tmp_path / name, max_steps=MAX_STEPS)
    done = subprocess.run([TESSERA, "slurm", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "1",
                           "--time", "10", "--job-name", name, *flags, f"train.strategy={strategy}"], cwd=tmp_path,
                          env=child_env(**slurm_cluster), capture_output=True, text=True, timeout=120)
    check_run(done, done.stdout + done.stderr)
    return tmp_path / name, done.stdout.strip()


def job_log(run_dir: Path, name: str, job_id: str) -> str:
    return (run_dir / "slurm" / f"{name}-{job_id}.out").read_text()


def placement(log: str, launcher: str = "torchrun") -> dict[int, str]:
    """rank → node, from the line each rank prints when it starts."""
    pattern = rf"tessera pretrain: rank (\d+)/2 \(local 0/1\) on (\S+) via {launcher},"
    return {int(m[1]): m[2] for m in re.finditer(pattern, log)}


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory, shards) -> dict[int, float]:
    """The rendered sbatch submitted with `sbatch --wait`: it must finish with status 0."""
    tmp_path = tmp_path_factory.mktemp("slurm-whole")
    script = tmp_path / "whole.sbatch"
    run_dir, _ = render(tmp_path, shards, slurm_cluster, "whole", "--out", str(script))
    done = subprocess.run(["sbatch", "--parsable", "--wait", str(script)], cwd=tmp_path,
                          env=child_env(**slurm_cluster), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    job_id = done.stdout.strip().split(";")[0]
    log = job_log(run_dir, "whole", job_id) if job_id else ""
    check_run(done, f"{done.stdout}{done.stderr}\n--- job log ---\n{log}")
    assert placement(log) in ({0: "n1", 1: "n2"}, {0: "n2", 1: "n1"}), log[-3000:]
    assert (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    assert (run_dir / "config.yaml").is_file()
    return losses(run_dir)


def test_sbatch_two_nodes_trains_to_completion(uninterrupted):
    assert sorted(uninterrupted) == list(range(1, MAX_STEPS + 1))
    assert uninterrupted[MAX_STEPS] < uninterrupted[1]


@pytest.mark.parametrize(
    ("launcher", "strategy", "tol"),
    [("torchrun", "ddp", 1e-6), ("deepspeed", "zero2", 2e-4)],  # ZeRO-2 sums gradients in another order
)
def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, uninterrupted, tmp_path, shards,
                                                     launcher, strategy, tol):
    env = child_env(**slurm_cluster)
    run_dir, job_id = render(tmp_path, shards, slurm_cluster, "preempt", "--submit", "--launcher", launcher,
                             strategy=strategy)
    assert job_id.isdigit(), job_id
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, "the first logged step")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    state = _wait_for(lambda: _finished(job_id, env), "the requeued job to finish")
    log = job_log(run_dir, "preempt", job_id)
    assert state == ("COMPLETED", "0:0", "1"), f"{state}\n{log[-3000:]}"
    stopped = re.search(r"preempted at step (\d+), checkpoint saved", log)
    assert stopped and 1 <= int(stopped[1]) < MAX_STEPS, log[-3000:]
    assert "requeueing job" in log and "(restart 1)" in log
    assert placement(log.split("(restart 1)")[1], launcher) in ({0: "n1", 1: "n2"}, {0: "n2", 1: "n1"})
    resumed = losses(run_dir)
    assert resumed[MAX_STEPS] == pytest.approx(uninterrupted[MAX_STEPS], abs=tol)
    assert_same_curve(resumed, uninterrupted, tol=max(tol, 1e-5))


def _finished(job_id: str, env: dict[str, str]) -> tuple[str, str, str] | None:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out))
    if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        return fields["JobState"], fields.get("ExitCode", "?"), fields.get("Restarts", "?")
    return None


def _wait_for(condition, what: str, timeout_s: float = JOB_TIMEOUT_S, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
