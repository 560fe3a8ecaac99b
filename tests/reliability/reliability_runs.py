"""Helpers of the reliability tests: the tiny run's command-line overrides, damaging files, reading errors."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL = ["model.preset=tiny-llama", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
              "model.d_ff=64", "model.max_seq_len=64"]


def run_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A ~25k-parameter decoder, seq 32, batch 2, 2 steps, a checkpoint at the end."""
    return [*TINY_MODEL, f"data.train={shards}", "data.seq_len=32", "data.num_workers=0",
            "train.micro_batch_size=2", "train.max_steps=2", "train.warmup_steps=1", "train.lr=3e-3",
            f"log.dir={run_dir}", "log.progress=false", *extra]


def flip_bytes(path: Path, count: int = 8) -> None:
    """Invert ``count`` bytes in the middle of ``path``: the size stays the same."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def one_error_line(capsys, command: str) -> str:
    """The single ``tessera COMMAND: error: ...`` line on stderr (anything more fails the test)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"tessera {command}: error: "), err
    return lines[0]
