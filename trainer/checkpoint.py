"""Checkpoints: one directory per step, made visible atomically, with a manifest written last.

Layout of ``<checkpoint.dir>/``::

    latest                 text file: the name of the newest complete step directory
    step_000100/
      dcp/ or deepspeed/   the strategy's sharded model + optimizer state
      rank_00000.pt ...    per rank: data-loader state and RNG states
      trainer_state.json   step, tokens seen, world size, strategy, ...
      config.yaml          the resolved run config
      model/               consolidated weights (model.safetensors + model.yaml) + tokenizer files
      manifest.json        every file above with its size and sha256: present only when complete
      deepspeed_universal/ added later, by a ZeRO resume on another world size (derived, so not in the manifest)

A step is written under ``.tmp_step_000100`` and renamed once the manifest is in place; ``latest``
is replaced with ``os.replace``. A crash mid-save leaves only a ``.tmp_*`` directory (removed by
the next save), never a half-written step behind ``latest``. Loading checks the manifest first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from common.errors import UserError
from trainer.distributed import DistEnv, barrier

MANIFEST = "manifest.json"
LATEST = "latest"
STATE = "trainer_state.json"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def load_rank_state(path: Path) -> dict[str, Any]:
    """A rank's data-loader and RNG state: tensors and plain values only, never pickled code."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint file {path} is not plain tensor data and was not loaded ({first})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    os.replace(tmp, directory / MANIFEST)


def verify(directory: Path) -> None:
    """Fail with one line unless ``directory`` is a complete checkpoint (manifest present, sizes match)."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise UserError(f"checkpoint {directory} is incomplete (no {MANIFEST}): its save did not finish")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        raise UserError(f"checkpoint {directory}: {MANIFEST} is unreadable") from None
    for name, entry in files.items():
        path = directory / name
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise UserError(f"checkpoint {directory} is truncated: {name} is {found}, expected {entry['bytes']} bytes")


def resolve(path: Path) -> Path:
    """A step directory, or a checkpoints directory whose ``latest`` names one; verified."""
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    verify(path)
    return path


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (verified), or None when there is none yet."""
    if not (root / LATEST).is_file():
        return None
    return resolve(root)


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE).read_text())


class CheckpointWriter:
    """Writes step directories; every rank calls :meth:`begin` and :meth:`commit` together."""

    def __init__(self, root: Path, keep_last: int, env: DistEnv) -> None:
        self.root = root
        self.keep_last = keep_last
        self.env = env

    def begin(self, step: int) -> Path:
        tmp = self.root / f".tmp_{step_name(step)}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        return tmp

    def commit(self, tmp: Path, step: int, state: dict[str, Any]) -> Path:
        """Write the trainer state and manifest, rename into place, point ``latest`` at it, prune."""
        barrier()
        final = self.root / step_name(step)
        if self.env.is_main:
            (tmp / STATE).write_text(json.dumps(state, indent=1))
            write_manifest(tmp)
            if final.exists():  # this step is already saved (and complete): keep that one
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
            pointer = self.root / f"{LATEST}.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.root / LATEST)
            self.prune()
        barrier()
        return final

    def prune(self) -> None:
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in steps[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
