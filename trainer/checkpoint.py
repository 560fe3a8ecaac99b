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

Auto-resume falls back: when ``latest`` is missing or names a step that is missing, incomplete or
fails verification, the newest step that verifies is used, with a warning; when none does, one line
says so (never a silent restart beside old steps). A save replaces a step directory of the same
name, and pruning removes steps newer than the one just saved (left by a history this run
abandoned), so two histories never mix in one directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from common import manifest
from common.errors import UserError, out_of_space
from trainer.distributed import DistEnv, all_reduce, barrier

MANIFEST = manifest.MANIFEST
LATEST = "latest"
STATE = manifest.STEP_STATE
STEP_DIR = re.compile(r"step_(\d{6,})")
TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")  # PytorchStreamWriter's words when a write came up short
LOW_SPACE_BYTES = 64 << 20

log = logging.getLogger(__name__)


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def load_rank_state(path: Path) -> dict[str, Any]:
    """A rank's data-loader and RNG state: tensors and plain values only, never pickled code."""
    import pickle

    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint file {path} is not plain tensor data and was not loaded ({first})") from None
    if not isinstance(state, dict) or not {"loader", "rng"} <= set(state) or not isinstance(state["rng"], dict):
        raise UserError(f"checkpoint file {path} holds no data-loader and RNG state (damaged, or not a rank file "
                        "of Tessera's); the checkpoint cannot be resumed")
    return state


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


def step_dirs(root: Path) -> list[Path]:
    """The step directories under ``root``, newest (highest step) first."""
    found = [p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)), reverse=True)


def latest(root: Path, env: DistEnv | None = None) -> Path | None:
    """The checkpoint to auto-resume under ``root`` (verified), or None when it holds no step yet.

    ``latest`` when it names a step that verifies; otherwise the newest step that does, with a
    warning; one line when steps exist but none verifies."""
    pointer = root / LATEST
    named = root / pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    candidates = [p for p in step_dirs(root) if p != named]
    if named is None and not candidates:
        return None
    if named is None:
        problem = f"{pointer} is missing"
    elif not named.is_dir():
        problem = f"{pointer} names {named.name}, which does not exist"
    else:
        try:
            verify(named, env)
            read_state(named)
            return named
        except UserError as e:
            problem = f"{pointer} names a step that cannot be used ({e})"
    rejected = []
    for step in candidates:
        try:
            verify(step, env)
            read_state(step)
        except UserError:
            rejected.append(step.name)
            continue
        if env is None or env.is_main:
            also = f"; also unusable: {', '.join(rejected)}" if rejected else ""
            log.warning("checkpoint.resume=auto: %s; resuming from %s, the newest step that verifies%s",
                        problem, step.name, also)
        return step
    unusable = f" ({', '.join(rejected)} fail verification)" if rejected else ""
    raise UserError(f"{problem}, and no other step under {root} verifies{unusable}: remove the damaged steps "
                    "to start afresh, or set another checkpoint.dir")


STATE_KEYS = {"step": int, "tokens_seen": int, "world_size": int, "strategy": str, "format": str, "guard": dict}


def read_state(directory: Path) -> dict[str, Any]:
    """``trainer_state.json``; one line when it is missing, not JSON or lacks a field of :data:`STATE_KEYS`."""
    path = directory / STATE
    try:
        state = json.loads(path.read_text())
        wrong = [k for k, kind in STATE_KEYS.items() if not isinstance(state.get(k), kind)]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        wrong = [type(e).__name__]
    if wrong or state["step"] < 0 or state["world_size"] < 1:
        raise UserError(f"checkpoint {directory}: {STATE} is damaged ({', '.join(wrong) or 'out of range'}); "
                        "the checkpoint cannot be resumed")
    return state


class CheckpointWriter:
    """Writes step directories; every rank calls :meth:`begin` and :meth:`commit` together."""

    def __init__(self, root: Path, keep_last: int, env: DistEnv) -> None:
        self.root = root
        self.keep_last = keep_last
        self.env = env

    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp_{step_name(step)}"

    def begin(self, step: int) -> Path:
        tmp = self.tmp_dir(step)
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
            if final.exists():  # left by an abandoned history (or damaged): this run's save replaces it
                stale = self.root / f".old_{final.name}"
                shutil.rmtree(stale, ignore_errors=True)
                os.rename(final, stale)
                os.rename(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(tmp, final)
            pointer = self.root / f"{LATEST}.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.root / LATEST)
            self.prune(step)
        barrier()
        return final

    def out_of_space(self, exc: BaseException) -> bool:
        """Whether a save failed on a full disk: said by the error itself (:func:`common.errors.out_of_space`),
        or a short write of ``torch.save`` (DeepSpeed's files), whose error keeps no errno, on a
        filesystem with under ``LOW_SPACE_BYTES`` left."""
        if out_of_space(exc):
            return True
        short_write = any(text in str(exc) for text in TORCH_SHORT_WRITE)
        return short_write and self.root.is_dir() and shutil.disk_usage(self.root).free < LOW_SPACE_BYTES

    def disk_full(self, step: int, previous: Path | None) -> UserError:
        """The full disk during the save of ``step``: its temporary directory is removed (the space it
        held comes back) and the error says the previous checkpoint, which ``latest`` still names, is intact."""
        if self.env.is_main:
            shutil.rmtree(self.tmp_dir(step), ignore_errors=True)
        free = shutil.disk_usage(self.root).free / 1e6 if self.root.is_dir() else 0.0
        kept = (f"the previous checkpoint {previous.name} is intact ({LATEST} names it)" if previous
                else "there is no earlier checkpoint")
        return UserError(f"no space left on device while saving checkpoint {step_name(step)} in {self.root} "
                         f"({free:.1f} MB free once its partial files were removed); {kept}: free space (or lower "
                         "checkpoint.keep_last, or set checkpoint.dir elsewhere) and rerun to resume")

    def prune(self, step: int) -> None:
        """Keep the newest ``keep_last`` steps up to ``step`` (the one just saved); steps above it belong
        to a history this run abandoned (a damaged step resumed past, an older step resumed) and go."""
        steps = step_dirs(self.root)
        newer = [p for p in steps if int(STEP_DIR.fullmatch(p.name).group(1)) > step]
        kept = [p for p in steps if p not in newer]
        for old in newer + kept[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in [*self.root.glob(".tmp_step_*"), *self.root.glob(".old_step_*")]:
            shutil.rmtree(stale, ignore_errors=True)
