"""Helpers for the launcher tests: a tiny run's config, a clean child environment, loss curves."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

TINY_MODEL = {"preset": "tiny-llama", "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "max_seq_len": 64}
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "GROUP_RANK")


def write_config(path: Path, shards: Path, run_dir: Path, max_steps: int = 8) -> Path:
    """A ~30k-parameter decoder, seq 32, global batch 4 (2 per micro-batch), fp32, no progress bar."""
    raw = {
        "model": TINY_MODEL,
        "data": {"train": str(shards), "seq_len": 32, "num_workers": 0},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": max_steps, "lr": 3e-3,
                  "min_lr": 3e-4, "warmup_steps": 2, "seed": 0},
        "checkpoint": {"keep_last": 2},
        "log": {"dir": str(run_dir), "progress": False},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def child_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's rank variables (a child must not inherit ours)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled", **extra)
    return env


def losses(run_dir: Path) -> dict[int, float]:
    """step → training loss from metrics.jsonl (a resumed run's later lines win)."""
    curve: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            curve[record["step"]] = record["loss"]
    return curve


def assert_same_curve(got: dict[int, float], want: dict[int, float], tol: float = 1e-4) -> None:
    assert sorted(got) == sorted(want), f"steps differ: {sorted(got)} vs {sorted(want)}"
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= tol, f"loss curves differ by {worst:.2e}: {got} vs {want}"


def check_run(proc: subprocess.CompletedProcess | subprocess.Popen, output: str) -> None:
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{output[-4000:]}"
