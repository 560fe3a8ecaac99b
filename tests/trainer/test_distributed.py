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
from model.config import ModelConfig
from model.transformer import build_model
from trainer.config import ParallelConfig, TrainConfig
from trainer.distributed import init_distributed, teardown
from trainer.strategy import build_strategy

strategy_name, tp = sys.argv[1], int(sys.argv[2])
env = init_distributed(need_group=True)
strategy = build_strategy(TrainConfig(strategy=strategy_name), env, parallel=ParallelConfig(tp=tp), seq_len=8)
model = strategy.wrap(build_model(ModelConfig(vocab_size=64, d_model=32, n_heads=2, d_ff=64, max_seq_len=16)))
for _ in range(2):  # real steps (ZeRO-3 caches its release plan once its first step traced the modules)
    strategy.backward(model(torch.randint(0, 64, (2, 8))).float().pow(2).mean())
    strategy.step(1e-3)
del strategy, model  # what a run drops when it returns
teardown()
names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
print(" ".join(sorted(name for name in names if "gloo" in name)))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "tp", "ranks"),
                         [("ddp", 1, 1), ("fsdp", 1, 1), ("zero2", 1, 1), ("zero3", 1, 1), ("fsdp", 2, 2)],
                         ids=["ddp", "fsdp", "zero2", "zero3", "fsdp_tp"])
def test_teardown_ends_the_groups_threads_before_exit(strategy, tp, ranks):
    """After a step and teardown no gloo thread of the run's groups is left running. Left for interpreter
    shutdown to tear down, they made a rank that had finished a 2-node SLURM run abort at exit now and then
    ("terminate called without an active exception"). What held them: torch.distributed.nn's default
    arguments, first imported by DDP while the group was up; DTensor's caches, which keep FSDP2's and tensor
    parallel's meshes; DeepSpeed's engine (its gradient hooks, ZeRO-3's module stack and release-plan cache)
    and its own group references. A fresh
    interpreter per rank: this one may have imported torch.distributed.nn or deepspeed already."""
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER, "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(Path(__file__).parents[2]))
    if ranks > 1:
        env.update(WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, "-c", GROUP_THREADS_LEFT, strategy, str(tp)],
                              env={**env, "RANK": str(rank)} if ranks > 1 else env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(ranks)]
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"rank {rank}: {err[-3000:]}"
        assert out.strip() == "", f"rank {rank}: gloo threads still running after teardown: {out.strip()}"
