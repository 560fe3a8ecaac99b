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
      deepspeed_universal/ added later, by a ZeRO resume on another world size (derived: its own manifest)

A step is written under ``.tmp_step_000100`` and renamed once the manifest is in place; ``latest``
is replaced with ``os.replace``. A crash mid-save leaves only a ``.tmp_*`` directory (removed by
the next save), never a half-written step behind ``latest``. Resuming checks every file's size and
sha256 against the manifest first (common/manifest.py), before anything is unpickled or read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from common import manifest
from common.errors import UserError
from trainer.distributed import DistEnv, all_reduce, barrier

MANIFEST = manifest.MANIFEST
LATEST = "latest"
STATE = "trainer_state.json"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def load_rank_state(path: Path) -> dict[str, Any]:
    """A rank's data-loader and RNG state: tensors and plain values only, never pickled code."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint file {path} is not plain tensor data and was not loaded ({first})") from None


def verify(directory: Path, env: DistEnv | None = None, hashes: bool = True) -> None:
    """Fail with one line unless ``directory`` is a complete, unchanged checkpoint: manifest present,
    every listed file of its size and (``hashes``) its sha256. With ``env`` every rank calls it
    together and hashes its share of the files; a bad file on any rank fails them all."""
    files = manifest.read_manifest(directory)
    manifest.check_sizes(directory, files)
    if not hashes:
        return
    names = sorted(files)
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    bad = manifest.damaged(directory, files, names[rank::world])
    if world > 1:  # the lowest bad index found on any rank, or len(names)
        index = torch.tensor([names.index(bad) if bad is not None else len(names)], device=env.device)
        index = int(all_reduce(index, op=torch.distributed.ReduceOp.MIN).item())
        bad = names[index] if index < len(names) else None
    if bad is not None:
        raise manifest.damaged_error(directory, bad)


def resolve(path: Path, env: DistEnv | None = None, hashes: bool = True) -> Path:
    """A step directory, or a checkpoints directory whose ``latest`` names one; verified (see :func:`verify`)."""
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    verify(path, env, hashes)
    return path


def latest(root: Path, env: DistEnv | None = None) -> Path | None:
    """The newest complete checkpoint under ``root`` (verified), or None when there is none yet."""
    if not (root / LATEST).is_file():
        return None
    return resolve(root, env)


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
            manifest.write_manifest(tmp)
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
