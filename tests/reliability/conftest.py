"""Fixtures of the reliability tests: a tiny real corpus and one short real run with a checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from reliability_runs import run_overrides

SOURCE = Path(__file__).parents[2] / "examples" / "data" / "pretrain_tinystories_valid_head.txt"


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Text shards of ~120 short stories with their byte-level BPE tokenizer (vocab 320)."""
    from data.make_shards import make_shards
    from data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("reliability-corpus")
    blocks = [b for b in SOURCE.read_text().split("\n\n") if b.strip()][:120]
    (root / "train.txt").write_text("\n\n".join(blocks) + "\n")
    train_tokenizer([(root / "train.txt").read_text()], root / "tokenizer", vocab_size=320)
    make_shards([str(root / "train.txt")], root / "tokenizer", root / "train", kind="text",
                shard_bytes=8 << 10, append_eos=True)
    return root / "train"


@pytest.fixture(scope="session")
def trained_run(shards, tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints/step_000002); copy it before changing anything in it."""
    from launch.entry import load
    from trainer.run import run

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(load(None, run_overrides(shards, run_dir)), "pretrain")
    return run_dir


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run, to damage."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))
