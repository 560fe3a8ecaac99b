"""launch.env: each launcher's variables → one DistEnv; host lists; the rendezvous timeout."""

import socket
import time

import pytest

from common.errors import UserError
from launch import env


def test_torchrun_variables():
    e = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node7",
         "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"}
    d = env.detect(e)
    assert (d.launcher, d.rank, d.local_rank, d.world_size, d.local_world_size) == ("torchrun", 3, 1, 4, 2)
    assert (d.master_addr, d.master_port) == ("node7", 29400)


def test_accelerate_and_deepspeed_launchers_are_named():
    base = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    assert env.detect({**base, "ACCELERATE_USE_CPU": "true"}).launcher == "accelerate"
    ds = env.detect({**base, "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"})
    assert (ds.launcher, ds.local_world_size) == ("deepspeed", 2)


def test_mpi_variables_need_master_addr():
    e = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
         "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    with pytest.raises(UserError, match="MASTER_ADDR"):
        env.detect(e)
    d = env.detect({**e, "MASTER_ADDR": "head", "MASTER_PORT": "6000"})
    assert (d.launcher, d.rank, d.local_rank, d.world_size, d.local_world_size) == ("mpi", 5, 1, 8, 4)
    pmi = env.detect({"PMI_RANK": "2", "PMI_SIZE": "3", "MASTER_ADDR": "head"})
    assert (pmi.rank, pmi.world_size, pmi.master_port) == (2, 3, 29500)


def test_srun_step_variables():
    e = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "6", "SLURM_NODEID": "1",
         "SLURM_STEP_NODELIST": "gpu-[07-09]", "SLURM_JOB_NODELIST": "gpu-[07-09]", "SLURM_JOB_ID": "123456",
         "SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURMD_NODENAME": "gpu-08"}
    d = env.detect(e)
    assert (d.launcher, d.rank, d.local_rank, d.world_size, d.local_world_size) == ("slurm", 3, 1, 6, 2)
    assert (d.master_addr, d.master_port, d.node) == ("gpu-07", env.SLURM_PORT_BASE + 3456, "gpu-08")


def test_batch_shell_is_one_process_and_torchrun_wins_inside_srun():
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", "MASTER_PORT": "4000"}
    assert (env.detect(batch).launcher, env.detect(batch).world_size) == ("single", 1)
    srun_torchrun = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]",
                     "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "9"}
    assert (env.detect(srun_torchrun).launcher, env.detect(srun_torchrun).rank) == ("torchrun", 2)


def test_one_process_gets_a_free_port():
    d = env.detect({})
    assert (d.launcher, d.rank, d.world_size, d.master_addr) == ("single", 0, 1, "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", d.master_port))  # the port is free


@pytest.mark.parametrize(
    ("e", "match"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "outside a world of size 2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "not a TCP port"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "local rank 3"),
    ],
)
def test_bad_variables_are_one_line_errors(e, match):
    with pytest.raises(UserError, match=match):
        env.detect(e)


def test_export_writes_the_torchrun_variables():
    target: dict[str, str] = {}
    env.export(env.detect({"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "7"}), target)
    assert target == {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
                      "MASTER_ADDR": "h", "MASTER_PORT": "7"}


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("gpu-[08-10,12],login", ["gpu-08", "gpu-09", "gpu-10", "gpu-12", "login"]),
        ("a[1-2]-ib,b[7]", ["a1-ib", "a2-ib", "b7"]),
    ],
)
def test_expand_hostlist(spec, hosts):
    assert env.expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["n[1-", "n[a-b]", "n[1-2]x[3]"])
def test_expand_hostlist_rejects_garbage(spec):
    with pytest.raises(UserError, match="cannot parse"):
        env.expand_hostlist(spec)


def test_tasks_per_node_notation():
    assert [env._tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]


def test_unreachable_rendezvous_times_out_with_one_line():
    port = env.free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(UserError, match=f"no rendezvous at 127.0.0.1:{port} after 1s"):
        env.wait_for_rendezvous("127.0.0.1", port, timeout=1.0)
    assert 1.0 <= time.monotonic() - start < 5
    with pytest.raises(UserError, match="does not resolve"):
        env.wait_for_rendezvous("no-such-host.invalid", port, timeout=30.0)


def test_rendezvous_found_when_rank0_listens():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        e = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(server.getsockname()[1]), env.RDZV_TIMEOUT_VAR: "5"}
        assert env.setup(e).rank == 1
        assert e["LOCAL_WORLD_SIZE"] == "2"


def test_a_run_in_this_process_leaves_the_environment_as_it_found_it():
    """Left behind, torchrun's variables made accelerate (under transformers' Trainer, later in the same
    process) start a gloo group that forked ranks inherited and hung on."""
    environ = {"PATH": "/usr/bin", "MASTER_PORT": "29555"}
    with env.launched(environ) as dist:
        assert dist.world_size == 1
        assert (environ["RANK"], environ["WORLD_SIZE"], environ["MASTER_PORT"]) == ("0", "1", "29555")
    assert environ == {"PATH": "/usr/bin", "MASTER_PORT": "29555"}
