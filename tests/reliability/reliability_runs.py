"""Helpers of the reliability tests: the tiny run's command-line overrides."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL = ["model.preset=tiny-llama", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
              "model.d_ff=64", "model.max_seq_len=64"]


def run_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A ~25k-parameter decoder, seq 32, batch 2, 2 steps, a checkpoint at the end."""
    return [*TINY_MODEL, f"data.train={shards}", "data.seq_len=32", "data.num_workers=0",
            "train.micro_batch_size=2", "train.max_steps=2", "train.warmup_steps=1", "train.lr=3e-3",
            f"log.dir={run_dir}", "log.progress=false", *extra]
