"""Where things are in a trainer's ``checkpoints/`` directory, and the one walk from a path a user
gives (a checkpoints directory, a step directory) to the step it means. model/io.py reads a step's
weights through it; trainer/checkpoint.py writes, verifies and resumes steps.

Layout of ``<checkpoint.dir>/``::

    latest                 text file: the name of the newest complete step directory
    step_000100/
      dcp/ or deepspeed/   the strategy's sharded model + optimizer state
      rank_00000.pt ...    per rank: data-loader state and RNG states
      trainer_state.json   step, tokens seen, world size, strategy, ...
      config.yaml          the resolved run config
      model/               consolidated weights (model.safetensors + model.yaml) + tokenizer files
      manifest.json        every file above with its size and sha256: present only when complete
      deepspeed_universal/ added later, by a ZeRO resume on another world size (derived: its own manifest)
"""

from __future__ import annotations

import re
from pathlib import Path

from common.errors import UserError
from common.manifest import MANIFEST

LATEST = "latest"
STEP_MODEL_DIR = "model"  # the consolidated weights inside a step directory
STEP_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"step_(\d{6,})")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


STEP_MARKERS = (STEP_STATE, rank_file(0))  # files only a step directory holds (rank 0's state comes first)


def step_number(directory: Path) -> int:
    return int(STEP_DIR.fullmatch(directory.name).group(1))


def step_dirs(root: Path) -> list[Path]:
    """The step directories under ``root``, newest (highest step) first."""
    found = [p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=step_number, reverse=True)


def is_step(directory: Path) -> bool:
    """Whether ``directory`` is a trainer's step (complete or not): it holds a manifest or a step's state files."""
    return any((directory / name).is_file() for name in (MANIFEST, *STEP_MARKERS))


def named_by_latest(directory: Path) -> Path | None:
    """The sub-directory that ``directory/latest`` names, or None when there is no such file."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not name:
        raise UserError(f"{pointer}: empty; it should hold the name of a checkpoint sub-directory")
    return directory / name


def resolve_step(path: Path) -> Path:
    """The step directory ``path`` means: itself, or the one its ``latest`` names (a checkpoints directory)."""
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    return named_by_latest(path) or path
