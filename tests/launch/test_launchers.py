"""launch.pretrain under each launcher (2 gloo ranks on CPU) matches the single-process loss curve."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import assert_same_curve, check_run, child_env, losses, write_config

from common.net import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TIMEOUT_S = 300


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=TIMEOUT_S)
    check_run(done, done.stdout + done.stderr)
    return done


def ranks_seen(output: str, launcher: str) -> set[str]:
    return {line.split(":", 1)[1].split(" (")[0].strip() for line in output.splitlines()
            if line.startswith("tessera pretrain: rank") and f"via {launcher}," in line}


def test_tessera_nproc_ddp_survives_preemption(tmp_path, shards, long_reference):
    """`tessera pretrain --nproc 2`: USR1 to it reaches both ranks, which checkpoint and exit 0; the
    same command then resumes, and the whole curve is the single-process one."""
    cfg = write_config(tmp_path / "run.yaml", shards, tmp_path / "run", max_steps=max(long_reference))
    cmd = [str(BIN / "tessera"), "pretrain", "--config", str(cfg), "--nproc", "2", "train.strategy=ddp"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.is_file() and metrics.read_text()) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGUSR1)
    output = first.communicate(timeout=TIMEOUT_S)[1]
    check_run(first, output)
    assert ranks_seen(output, "env") == {"rank 0/2", "rank 1/2"}
    stopped = re.search(r"preempted at step (\d+), checkpoint saved", output)
    assert stopped and int(stopped[1]) < max(long_reference), output[-3000:]
    second = run(cmd, tmp_path)
    assert f"at step {stopped[1]}" in second.stderr  # resumed where the first run stopped
    assert_same_curve(losses(tmp_path / "run"), long_reference)  # 2 ranks sum in another order: ~2e-5 apart


def test_two_torchrun_nodes_run_ddp(tmp_path, shards, reference):
    """Two torchrun invocations, --nnodes 2 on 127.0.0.1 with c10d rendezvous: two simulated nodes."""
    cfg = write_config(tmp_path / "run.yaml", shards, tmp_path / "run")
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
             "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=ddp2",
             "-m", "launch.pretrain", f"--config={cfg}", "train.strategy=ddp"],
            cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    outputs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        check_run(proc, output)
    assert ranks_seen("".join(outputs), "torchrun") == {"rank 0/2", "rank 1/2"}
    assert_same_curve(losses(tmp_path / "run"), reference)


def test_deepspeed_launcher_with_hostfile_runs_zero2(tmp_path, shards, reference):
    cfg = write_config(tmp_path / "run.yaml", shards, tmp_path / "run")
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    done = run([str(BIN / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"), "--no_ssh_check",
                "--master_addr", "127.0.0.1", f"--master_port={free_port()}", "--module", "launch.pretrain",
                f"--config={cfg}", "train.strategy=zero2"], tmp_path)
    assert ranks_seen(done.stdout + done.stderr, "deepspeed") == {"rank 0/2", "rank 1/2"}
    assert_same_curve(losses(tmp_path / "run"), reference)


def test_accelerate_launch_runs_our_fsdp(tmp_path, shards, reference):
    cfg = write_config(tmp_path / "run.yaml", shards, tmp_path / "run")
    recipe = Path(__file__).parents[2] / "configs" / "accelerate" / "cpu-2proc.yaml"
    done = run([str(BIN / "accelerate"), "launch", "--config_file", str(recipe), f"--main_process_port={free_port()}",
                "-m", "launch.pretrain", f"--config={cfg}", "train.strategy=fsdp"], tmp_path)
    assert ranks_seen(done.stdout + done.stderr, "accelerate") == {"rank 0/2", "rank 1/2"}
    assert_same_curve(losses(tmp_path / "run"), reference)


def test_tessera_nproc_stops_the_others_when_a_rank_dies(tmp_path, shards):
    """A rank killed mid-run: the others are stopped too and the exit status says how it died."""
    import psutil

    cfg = write_config(tmp_path / "run.yaml", shards, tmp_path / "run", max_steps=100000)
    parent = subprocess.Popen([str(BIN / "tessera"), "pretrain", "--config", str(cfg), "--nproc", "2",
                               "train.strategy=ddp"], cwd=tmp_path, env=child_env(), stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.is_file() and metrics.read_text()) and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    ranks = psutil.Process(parent.pid).children()
    assert len(ranks) == 2
    ranks[1].kill()
    output = parent.communicate(timeout=TIMEOUT_S)[1]
    assert parent.returncode == 128 + signal.SIGKILL, output[-3000:]
    assert not ranks[0].is_running() or ranks[0].status() == psutil.STATUS_ZOMBIE
