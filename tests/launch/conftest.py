"""Fixtures of the launcher tests: a tiny real corpus, the single-process reference run, a local SLURM."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from launching import losses, write_config

REPO = Path(__file__).parents[2]
SOURCE = REPO / "examples" / "data" / "pretrain_tinystories_valid_head.txt"
CLUSTER_SCRIPT = REPO / "tests" / "slurm-local-cluster.sh"


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Text shards of ~240 short stories and their byte-level BPE tokenizer (vocab 384)."""
    from data.make_shards import make_shards
    from data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("launch-corpus")
    blocks = [b for b in SOURCE.read_text().split("\n\n") if b.strip()][:240]
    text = "\n\n".join(blocks) + "\n"
    (root / "train.txt").write_text(text)
    train_tokenizer([text], root / "tokenizer", vocab_size=384)
    make_shards([str(root / "train.txt")], root / "tokenizer", root / "train", kind="text",
                shard_bytes=8 << 10, append_eos=True, txt_mode="block")
    return root / "train"


def _single_process_curve(shards: Path, root: Path, max_steps: int) -> dict[int, float]:
    from launch.entry import load
    from trainer.run import run

    run(load(write_config(root / "run.yaml", shards, root / "run", max_steps=max_steps), []), "pretrain")
    return losses(root / "run")


@pytest.fixture(scope="session")
def reference(shards, tmp_path_factory) -> dict[int, float]:
    """The loss curve of the tiny config (8 steps) trained by one process, strategy single."""
    return _single_process_curve(shards, tmp_path_factory.mktemp("reference"), 8)


@pytest.fixture(scope="session")
def long_reference(shards, tmp_path_factory) -> dict[int, float]:
    """The same over 150 steps: long enough to interrupt a run in the middle."""
    return _single_process_curve(shards, tmp_path_factory.mktemp("long-reference"), 150)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """A real SLURM on this host: slurmctld + two slurmd (n1, n2, one fake GPU each), via
    tests/slurm-local-cluster.sh. Needs root; installs Debian's packages with apt when missing."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it starts munged, slurmctld and slurmd)")
    if not shutil.which("slurmctld"):
        if not shutil.which("apt-get"):
            pytest.skip("SLURM is not installed and there is no apt-get to install it")
        done = subprocess.run(["bash", str(CLUSTER_SCRIPT), "install"], capture_output=True, text=True, timeout=900)
        if done.returncode or not shutil.which("slurmctld"):
            pytest.skip(f"apt-get could not install SLURM: {(done.stderr or done.stdout).strip()[-300:]}")
    base = Path(tempfile.gettempdir()) / "tessera-slurm-tests"
    env = dict(os.environ, BASE=str(base), NGPU="1", NCPU="2")
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], env=env, capture_output=True)  # a stale one
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up", "2"], env=env, capture_output=True, text=True,
                        timeout=120)
    if up.returncode:
        pytest.fail(f"the local SLURM did not come up:\n{up.stdout}\n{up.stderr}")
    try:
        yield {"SLURM_CONF": str(base / "etc" / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], env=env, capture_output=True)
