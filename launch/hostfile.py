"""DeepSpeed hostfiles: ``HOST slots=N`` per line, as the ``deepspeed`` launcher reads them.

``python -m launch.hostfile --slots N --out FILE`` writes the hostfile of the current SLURM job
(its nodes from SLURM_JOB_NODELIST, in order), which the sbatch script of ``tessera slurm
--launcher deepspeed`` runs on every node before starting the launcher there.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.errors import UserError
from launch.env import slurm_hosts


def render(hosts: list[str], slots: int) -> str:
    """The hostfile text for ``hosts``, each with ``slots`` processes."""
    if not hosts:
        raise UserError("a hostfile needs at least one host")
    if slots < 1:
        raise UserError(f"slots per host must be at least 1, got {slots}")
    if len(set(hosts)) != len(hosts):
        raise UserError(f"a host appears twice in {hosts}; the deepspeed launcher refuses that")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def write(path: Path, hosts: list[str], slots: int) -> None:
    """Write atomically, so ranks on a shared file system never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(render(hosts, slots))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.hostfile", description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, required=True, help="processes per host")
    parser.add_argument("--out", type=Path, required=True, help="where to write the hostfile")
    parser.add_argument("--nodelist", help="SLURM node list (default: $SLURM_JOB_NODELIST)")
    args = parser.parse_args(argv)
    try:
        nodelist = args.nodelist or os.environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise UserError("no node list: pass --nodelist or run inside a SLURM job")
        write(args.out, slurm_hosts(nodelist), args.slots)
    except UserError as exc:
        print(f"launch.hostfile: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
