"""trainer/distributed.py: a process group made for a single-process run leaves nothing behind."""

import os

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
