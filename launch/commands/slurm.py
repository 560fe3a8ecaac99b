"""`tessera slurm --config FILE --nodes N --gpus-per-node G [...] [--out FILE] [--submit]`.

Renders the sbatch script of a run (see :mod:`launch.slurm`); prints it, writes it (--out), or
submits it and prints the job id (--submit). The node and GPU counts are checked against the
parallel mesh (tp inside a node) and train.global_batch_size / micro_batch_size before anything is
written; the script names the mesh layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import ConfigError
from launch import entry
from launch.slurm import Launcher, MeshLayout, SlurmJob, render, submit

TASKS = ("pretrain", "sft", "align")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML recipe (optional: defaults + overrides also run)")
    parser.add_argument("--task", choices=TASKS, default="pretrain", help="what the job runs (default pretrain)")
    parser.add_argument("--nodes", type=int, required=True, metavar="N")
    parser.add_argument("--gpus-per-node", type=int, required=True, metavar="G",
                        help="processes per node, one per GPU (0: CPU nodes, one process each)")
    parser.add_argument("--launcher", choices=[m.value for m in Launcher], default="torchrun",
                        help="srun torchrun (c10d rendezvous), or one deepspeed launcher per node with a hostfile")
    for flag in ("--partition", "--account", "--qos"):
        parser.add_argument(flag)
    parser.add_argument("--time", help="time limit (MM, HH:MM:SS or D-HH:MM:SS)")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per node's task (shared by its ranks)")
    parser.add_argument("--mem", help="memory per node (e.g. 200G)")
    parser.add_argument("--job-name", help="default: tessera-TASK")
    parser.add_argument("--log-dir", type=Path, help="where %%x-%%j.out logs go (default: LOG.DIR/slurm)")
    parser.add_argument("--master-port", type=int, help="rendezvous port (default: 15000 + job id %% 10000)")
    parser.add_argument("--out", type=Path, help="write the script here instead of printing it")
    parser.add_argument("--submit", action="store_true", help="sbatch the script and print the job id")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from trainer.run import accumulation_steps

    cfg = entry.load(args.config, args.overrides)
    job_name = args.job_name or f"tessera-{args.task}"
    job = SlurmJob(
        task=args.task, args=entry.entry_args(args.config, args.overrides), nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, launcher=Launcher(args.launcher),
        log_dir=(args.log_dir or cfg.log.dir / "slurm").resolve(), workdir=Path.cwd(), job_name=job_name,
        partition=args.partition, account=args.account, qos=args.qos, time=args.time,
        cpus_per_task=args.cpus_per_task, mem=args.mem, master_port=args.master_port,
        mesh=MeshLayout(**{key: getattr(cfg.parallel, key) for key in ("tp", "cp", "pp", "ep")}),
    )
    job.validate()  # the mesh too: tp (× cp) inside a node, the world a multiple of tp·cp·pp·ep
    try:
        accumulation_steps(cfg, job.mesh.readers(job.world_size))
    except ConfigError as exc:
        raise ConfigError(f"--nodes {job.nodes} × {job.procs_per_node} processes per node: {exc}") from None
    script = render(job)
    job.log_dir.mkdir(parents=True, exist_ok=True)  # sbatch cannot create the directory of --output
    if not args.out and not args.submit:
        sys.stdout.write(script)
        return 0
    path = args.out or job.log_dir / f"{job_name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    if args.submit:
        print(submit(path))
    else:
        print(f"wrote {path}", file=sys.stderr)
    return 0
