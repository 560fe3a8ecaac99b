"""`tessera plot RUN_DIR`: draw a run's metrics.jsonl as PNG files beside it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.errors import UserError

# (file stem, title, metric keys drawn on the same axes)
PANELS: list[tuple[str, str, tuple[str, ...]]] = [
    ("loss", "loss", ("loss", "eval/loss")),
    ("lr", "learning rate", ("lr",)),
    ("tokens_per_s", "tokens / s", ("tokens_per_s",)),
    ("rewards", "DPO rewards", ("rewards/margins", "rewards/chosen", "rewards/rejected")),
    ("accuracy", "preference accuracy", ("rewards/accuracies", "eval/rewards/accuracies")),
    ("reward", "online reward (grpo, rloo)", ("reward", "eval/reward")),
    ("kl", "KL to the reference", ("kl",)),
    ("rollout_time", "seconds per step", ("time/rollout_s", "time/training_s")),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    written = plot_run(args.run_dir, args.out)
    for path in written:
        print(path)
    return 0


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}; pass a run directory (log.dir of a run)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not a JSON line") from None
    return rows


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write one PNG per panel that has data; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = out or run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, keys in PANELS:
        series = {k: [(r["step"], r[k]) for r in rows if k in r and "step" in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
        ax.set_title(f"{run_dir.name}: {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if not written:
        raise UserError(f"{run_dir}/metrics.jsonl has no plottable metrics")
    return written
