"""tessera slurm without a cluster: the rendered script, option checks, the batch-size check; hostfiles."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError, UserError
from launch import cli, hostfile
from launch.slurm import Launcher, MeshLayout, SlurmJob, render


def job(tmp_path: Path, **kw) -> SlurmJob:
    base = dict(task="pretrain", args=["--config=/cfg/a b.yaml", "train.lr=3e-4"], nodes=4, gpus_per_node=8,
                log_dir=tmp_path / "logs", workdir=tmp_path, job_name="tessera-pretrain")
    return SlurmJob(**{**base, **kw})


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, flags=re.M))


def bash_parses(script: str) -> None:
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_torchrun_script(tmp_path):
    script = render(job(tmp_path, partition="gpu", account="proj", qos="high", time="2-00:00:00",
                        cpus_per_task=64, mem="500G"))
    bash_parses(script)
    opts = sbatch_options(script)
    assert opts["nodes"] == "4" and opts["ntasks-per-node"] == "1" and opts["gpus-per-node"] == "8"
    assert (opts["partition"], opts["account"], opts["qos"], opts["time"]) == ("gpu", "proj", "high", "2-00:00:00")
    assert (opts["cpus-per-task"], opts["mem"]) == ("64", "500G")
    assert opts["output"] == f"{tmp_path}/logs/%x-%j.out" and opts["open-mode"] == "append"
    assert opts["signal"] == "B:USR1@120" and "requeue" in opts
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}" in script  # 64 CPUs over 8 ranks
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=64 \\\n" in script
    assert "--nproc-per-node=8" in script and "--rdzv-backend=c10d" in script
    assert '--rdzv-endpoint="$head_node:$master_port"' in script
    assert "-m launch.pretrain '--config=/cfg/a b.yaml' train.lr=3e-4 &" in script  # quoted for the shell
    assert "trap on_preempt USR1" in script and 'scancel --signal=TERM "${SLURM_JOB_ID}.0"' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert f"{sys.executable} -m torch.distributed.run" in script


def test_cpu_nodes_and_fixed_port(tmp_path):
    script = render(job(tmp_path, gpus_per_node=0, master_port=29777))
    assert "gpus-per-node" not in sbatch_options(script)
    assert "--nproc-per-node=1" in script and "master_port=29777" in script


def test_deepspeed_script_runs_one_launcher_per_node_with_a_hostfile(tmp_path):
    fake_python = tmp_path / "python"  # prints its arguments, one per line
    fake_python.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake_python.chmod(0o755)
    script = render(job(tmp_path, launcher=Launcher.deepspeed, args=["--config=/c/it's.yaml"],
                        python=str(fake_python)))
    bash_parses(script)
    assert "torch.distributed.run" not in script
    # run the srun line with srun as a pass-through: what would each node execute?
    step = script[script.index("srun --kill-on-bad-exit"):script.index("step_pid=")].replace(" &\n", "\n")
    body = 'srun() { while [ "${1#--}" != "$1" ]; do shift; done; "$@"; }\nhead_node=n1 master_port=1234\n' + step
    run_env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "7", "SLURM_NODEID": "1", "TMPDIR": str(tmp_path)}
    out = subprocess.run(["bash", "-c", body], capture_output=True, text=True, env=run_env, check=True)
    lines = out.stdout.splitlines()
    assert lines[:5] == ["-m", "launch.hostfile", "--slots", "8", "--out"]
    launcher = lines[lines.index("deepspeed.launcher.runner") - 1:]
    assert launcher == ["-m", "deepspeed.launcher.runner", "--hostfile", f"{tmp_path}/tessera-hostfile-7-1",
                        "--no_ssh", "--node_rank", "1", "--master_addr", "n1", "--master_port", "1234",
                        "--module", "launch.pretrain", "--config=/c/it's.yaml"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"nodes": 0}, "--nodes must be at least 1"),
        ({"gpus_per_node": -1}, "--gpus-per-node"),
        ({"time": "two hours"}, "not a SLURM time"),
        ({"mem": "lots"}, "not a SLURM size"),
        ({"partition": "gpu; rm -rf"}, "--partition"),
        ({"master_port": 0}, "not a TCP port"),
        ({"log_dir": Path("/a b")}, "whitespace"),
    ],
)
def test_bad_options(tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        render(job(tmp_path, **kw))


def test_command_prints_writes_and_checks_batch_sizes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  micro_batch_size: 2\n  global_batch_size: 16\nlog:\n  dir: runs/x\n")
    assert cli.main(["slurm", "--config", str(cfg), "--nodes", "2", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and f"--config={cfg}" in out
    assert (tmp_path / "runs/x/slurm").is_dir()  # sbatch cannot create the log directory itself

    assert cli.main(["slurm", "--config", str(cfg), "--nodes", "3", "--gpus-per-node", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--nodes 3 × 1 processes per node" in err and "global_batch_size=16" in err

    script = tmp_path / "job.sbatch"
    args = ["slurm", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "8", "--out", str(script),
            "--launcher", "deepspeed", "train.max_steps=5"]
    assert cli.main(args) == 0
    assert os.access(script, os.X_OK) and "train.max_steps=5" in script.read_text()


def test_command_without_sbatch_fails_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert cli.main(["slurm", "--nodes", "1", "--gpus-per-node", "0", "--submit"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


def test_hostfile_from_a_slurm_nodelist(tmp_path):
    out = tmp_path / "sub" / "hostfile"
    assert hostfile.main(["--slots", "2", "--out", str(out), "--nodelist", "n[1-2],gpu-07"]) == 0
    assert out.read_text() == "n1 slots=2\nn2 slots=2\ngpu-07 slots=2\n"
    with pytest.raises(UserError, match="appears twice"):
        hostfile.render(["a", "a"], 1)
    with pytest.raises(UserError, match="at least 1"):
        hostfile.render(["a"], 0)


def test_command_keeps_tensor_parallel_groups_inside_a_node(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  strategy: ddp\n  micro_batch_size: 2\n  global_batch_size: 8\n"
                   "parallel:\n  tp: 4\nlog:\n  dir: runs/x\n")
    # 4 nodes × 4 GPUs, tp=4 inside each node: 4 data-parallel groups of micro-batch 2
    assert cli.main(["slurm", "--config", str(cfg), "--nodes", "4", "--gpus-per-node", "4"]) == 0
    assert "\n# mesh: dp=4 × tp=4 (tp within a node)\n" in capsys.readouterr().out
    assert cli.main(["slurm", "--config", str(cfg), "--nodes", "8", "--gpus-per-node", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "parallel.tp=4 must divide the 2 processes per node" in err


@pytest.mark.parametrize(("nodes", "gpus", "mesh", "layout"), [
    (4, 8, MeshLayout(), "dp=32"),
    (4, 8, MeshLayout(tp=8), "dp=4 × tp=8 (tp within a node)"),
    (2, 8, MeshLayout(tp=2, cp=4), "dp=2 × cp=4 × tp=2 (cp within a node, tp within a node)"),
    (4, 2, MeshLayout(pp=4), "dp=2 × pp=4 (pp across nodes)"),
    (2, 4, MeshLayout(ep=8), "dp=1 × ep=8 (ep across nodes)"),
    (2, 4, MeshLayout(tp=2, pp=2), "dp=2 × pp=2 × tp=2 (pp within a node, tp within a node)"),
    (1, 0, MeshLayout(ep=1), "dp=1"),
])
def test_the_script_names_the_mesh_layout(tmp_path, nodes, gpus, mesh, layout):
    script = render(job(tmp_path, nodes=nodes, gpus_per_node=gpus, mesh=mesh))
    assert f"\n# mesh: {layout}\n" in script and f'echo "tessera: mesh: {layout} over' in script
    bash_parses(script)


@pytest.mark.parametrize(("nodes", "gpus", "mesh", "match"), [
    (8, 2, MeshLayout(tp=4), "parallel.tp=4 must divide the 2 processes per node"),
    (2, 8, MeshLayout(tp=3), "parallel.tp=3 must divide the 8 processes per node"),
    (2, 8, MeshLayout(tp=4, cp=4), r"parallel.tp=4 × parallel.cp=4 must divide the 8 processes per node"),
    (4, 0, MeshLayout(tp=2), "parallel.tp=2 must divide the 1 processes per node"),
    (3, 2, MeshLayout(pp=4), r"world size 6 is not divisible by pp=4 = 4"),
    (3, 4, MeshLayout(ep=8), r"world size 12 is not divisible by ep=8 = 8"),
    (3, 4, MeshLayout(tp=4, pp=2), r"world size 12 is not divisible by pp=2 × tp=4 = 8"),
])
def test_impossible_meshes_are_refused_in_one_line(tmp_path, nodes, gpus, mesh, match):
    with pytest.raises(ConfigError, match=match) as error:
        render(job(tmp_path, nodes=nodes, gpus_per_node=gpus, mesh=mesh))
    assert "\n" not in str(error.value)


def test_batch_job_array_script(tmp_path):
    from launch.slurm import BatchJob, array_spec, render_batch

    assert array_spec([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8" and array_spec([3]) == "3"
    array = BatchJob(command=["python", "-m", "x", "a b"], job_name="prep", log_dir=tmp_path / "logs",
                     workdir=tmp_path, array=[0, 1, 2, 4], time="10", cpus_per_task=1)
    script = render_batch(array)
    bash_parses(script)
    options = sbatch_options(script)
    assert options["array"] == "0-2,4" and options["time"] == "10" and options["output"].endswith("/%x-%A_%a.out")
    assert script.rstrip().endswith("exec python -m x 'a b'")
    single = sbatch_options(render_batch(BatchJob(command=["true"], job_name="m", log_dir=tmp_path, workdir=tmp_path)))
    assert "array" not in single and single["output"].endswith("/%x-%j.out")
    with pytest.raises(UserError, match="task numbers"):
        render_batch(BatchJob(command=["true"], job_name="m", log_dir=tmp_path, workdir=tmp_path, array=[]))
    with pytest.raises(UserError, match="not a SLURM time"):
        render_batch(BatchJob(command=["true"], job_name="m", log_dir=tmp_path, workdir=tmp_path, time="soon"))
