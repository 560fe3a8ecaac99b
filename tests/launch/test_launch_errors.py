"""Bad input to the entry points: one line on stderr, status 2, and a timeout instead of a hang."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import child_env

from common.net import free_port
from launch import cli
from launch.env import RDZV_TIMEOUT_VAR


def entry_point(*args: str, task: str = "pretrain", **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", f"launch.{task}", *args], env=child_env(**env),
                          capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - start


@pytest.mark.parametrize("task", ["pretrain", "sft", "align"])
def test_missing_config_is_one_line(tmp_path, task):
    done, _ = entry_point("--config", str(tmp_path / "nope.yaml"), task=task)
    assert done.returncode == 2
    assert done.stderr.strip() == f"tessera {task}: error: config file not found: {tmp_path / 'nope.yaml'}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "nope.yaml"], "config file not found: nope.yaml"),
        (["--config", "nope.yaml", "--nproc", "2"], "config file not found: nope.yaml"),
        (["--nproc", "2", "train.stratgy=ddp"], "unknown config key 'train.stratgy'"),
        (["--nproc", "0"], "--nproc must be at least 1"),
    ],
)
@pytest.mark.parametrize("task", ["pretrain", "sft", "align"])
def test_tessera_train_commands_bad_input(tmp_path, monkeypatch, capsys, task, args, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main([task, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"tessera {task}: error:") and message in err, err


@pytest.mark.slow
def test_unreachable_rendezvous_times_out_with_one_line():
    port = free_port()  # nothing listens: rank 0 never came up
    done, elapsed = entry_point(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(port), **{RDZV_TIMEOUT_VAR: "3"})
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"tessera pretrain: error: no rendezvous at 127.0.0.1:{port} after 3s")
    assert len(done.stderr.strip().splitlines()) == 1
    assert elapsed < 60


def test_unresolvable_rendezvous_host_is_one_line():
    done, _ = entry_point(RANK="1", WORLD_SIZE="2", MASTER_ADDR="no-such-host.invalid", MASTER_PORT="29500")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "tessera pretrain: error: rendezvous host 'no-such-host.invalid' does not resolve; check MASTER_ADDR"
    )


@pytest.mark.slow
def test_rank0_alone_times_out_with_one_line():
    """Rank 0 hosts the rendezvous; when the other ranks never come it stops after train.dist_timeout_s."""
    done, elapsed = entry_point("train.dist_timeout_s=2", RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(free_port()))
    assert done.returncode == 2
    *_, last = done.stderr.strip().splitlines()
    assert last.startswith("tessera pretrain: error: rendezvous at 127.0.0.1:") and "1/2 clients joined" in last
    assert "Traceback" not in done.stderr
    assert elapsed < 60


def test_a_users_model_py_in_the_launch_directory_does_not_shadow_ours(shards, tmp_path):
    """torchrun/deepspeed/srun run ``python -m launch.pretrain`` from the user's directory, which
    Python puts first on sys.path; the user's model.py and data.py there must not replace ours."""
    from launching import write_config

    repo = Path(__file__).resolve().parents[2]
    for name in ("model", "data", "trainer", "common"):
        (tmp_path / f"{name}.py").write_text(f"raise RuntimeError('the user\\'s {name}.py was imported')\n")
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "run", max_steps=2)
    env = child_env(PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, "-m", "launch.pretrain", f"--config={config}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    shadowed = subprocess.run([sys.executable, "-c", "import model, launch"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    assert "RuntimeError: the user's model.py was imported" in shadowed.stderr  # Python's own order, as a control
    imported_first = subprocess.run([sys.executable, "-c", "import sys; sys.modules['model'] = type(sys)('model'); "
                                     "import launch"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert imported_first.returncode == 2
    assert imported_first.stderr.strip().endswith("rename it or launch from another directory")
