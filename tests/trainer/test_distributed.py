"""trainer/distributed.py: a process group made for a single-process run leaves nothing behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from common.net import free_port
from trainer.distributed import init_distributed, teardown

LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_a_single_process_group_removes_the_launcher_variables_it_set(monkeypatch):
    """Left behind, they made accelerate (under transformers' Trainer, later in the same process) start
    a gloo group of its own that forked ranks then inherited and hung on."""
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)
    init_distributed(need_group=True)
    assert dist.is_initialized() and dist.get_world_size() == 1
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "127.0.0.1"
    teardown()
    assert not dist.is_initialized()
    assert [name for name in LAUNCHER if name in os.environ] == []


def test_a_launchers_own_variables_stay(monkeypatch):
    port = str(free_port())
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    init_distributed(need_group=True)
    teardown()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("127.0.0.1", port)
    assert "WORLD_SIZE" not in os.environ


GROUP_THREADS_LEFT = """
import os, sys
import torch
from torch.nn.parallel import DistributedDataParallel
from trainer.distributed import init_distributed, teardown

init_distributed(need_group=True)
model = DistributedDataParallel(torch.nn.Linear(4, 4))  # imports torch.distributed.nn, as a run does
model(torch.ones(2, 4)).sum().backward()
del model
teardown()
names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
print(" ".join(sorted(name for name in names if "gloo" in name)))
"""


@pytest.mark.slow
def test_teardown_ends_the_groups_threads_before_exit():
    """After teardown no gloo thread of the run's group is left running. Left for interpreter shutdown to
    tear down (torch.distributed.nn, first imported by DDP while the group was up, held it in its default
    arguments), it made a rank that had finished a 2-node SLURM run abort at exit now and then
    ("terminate called without an active exception"). A fresh interpreter: this one may have imported
    torch.distributed.nn already."""
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER, "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    done = subprocess.run([sys.executable, "-c", GROUP_THREADS_LEFT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"gloo threads still running after teardown: {done.stdout.strip()}"
