"""What every demo recipe is made of: `tessera` commands run as a user would, in numbered stages,
and a closing summary of the numbers and where each run is."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


class Stages:
    """A recipe's runner: ``out`` holds every stage's output; ``quick`` runs a few steps per stage (CI)."""

    def __init__(self, out: Path, quick: bool) -> None:
        self.out = out
        self.mode = "quick" if quick else "full"
        self.started = time.time()
        self.summary: dict[str, object] = {}

    def tessera(self, *args: str, capture: bool = False) -> str:
        """Run one `tessera` command as a user would, echoing it first."""
        print(f"\n$ tessera {shlex.join(args)}", flush=True)
        cmd = [sys.executable, "-m", "launch.cli", *args]
        result = subprocess.run(cmd, text=True, stdout=subprocess.PIPE if capture else None)
        if result.returncode:
            raise SystemExit(f"demo: `tessera {args[0]}` failed with status {result.returncode}")
        if capture:
            print(result.stdout, end="")
        return result.stdout or ""

    def stage(self, title: str) -> None:
        print(f"\n=== {title}  [{time.time() - self.started:.0f}s]", flush=True)

    def finish(self, runs: list[Path], exported: Path | None = None) -> None:
        """The closing summary: the key numbers, where each run (and the exported model) is."""
        print(f"\n=== done in {time.time() - self.started:.0f}s")
        for key, value in self.summary.items():
            print(f"  {key:<34} {value}")
        for run in runs:
            plots = ", plots/" if (run / "plots").is_dir() else ""
            print(f"  run {run.name:<30} {run}  (metrics.jsonl{plots}, checkpoints/)")
        if exported is not None:
            print(f"  {'exported model':<34} {exported}")
        if any(self.out.glob("*/wandb/offline-run-*")):
            print(f"  W&B runs were logged offline: `wandb sync {self.out}/*/wandb/offline-run-*` uploads them")
