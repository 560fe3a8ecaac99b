"""Checkpoints: the :class:`Checkpointer` saves, verifies and resumes a run; one directory per step,
made visible atomically, with a manifest written last. The layout is :mod:`common.checkpoint_layout`'s.

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

import dataclasses
import io
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from common import manifest
from common.checkpoint_layout import (
    LATEST,
    STEP_MODEL_DIR,
    STEP_STATE,
    named_by_latest,
    rank_file,
    resolve_step,
    step_dirs,
    step_name,
    step_number,
)
from common.config import dump_yaml, read_yaml
from common.errors import UserError, out_of_space
from trainer.distributed import DistEnv, all_reduce, barrier
from trainer.guard import LossGuard, TrainingDiverged

if TYPE_CHECKING:
    from trainer.config import RunConfig
    from trainer.strategy import Strategy

TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")  # PytorchStreamWriter's words when a write came up short
LOW_SPACE_BYTES = 64 << 20

log = logging.getLogger(__name__)


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
    step = resolve_step(path)
    verify(step, env, hashes)
    return step


def latest(root: Path, env: DistEnv | None = None) -> Path | None:
    """The checkpoint to auto-resume under ``root`` (verified), or None when it holds no step yet.

    ``latest`` when it names a step that verifies; otherwise the newest step that does, with a
    warning; one line when steps exist but none verifies."""
    pointer = root / LATEST
    try:
        named = named_by_latest(root)
    except UserError:  # an empty pointer: reported below as naming a step that cannot be used
        named = root
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
    path = directory / STEP_STATE
    try:
        state = json.loads(path.read_text())
        wrong = [k for k, kind in STATE_KEYS.items() if not isinstance(state.get(k), kind)]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        wrong = [type(e).__name__]
    if wrong or state["step"] < 0 or state["world_size"] < 1:
        raise UserError(f"checkpoint {directory}: {STEP_STATE} is damaged ({', '.join(wrong) or 'out of range'}); "
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
            (tmp / STEP_STATE).write_text(json.dumps(state, indent=1))
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
        newer = [p for p in steps if step_number(p) > step]
        kept = [p for p in steps if p not in newer]
        for old in newer + kept[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in [*self.root.glob(".tmp_step_*"), *self.root.glob(".old_step_*")]:
            shutil.rmtree(stale, ignore_errors=True)


def numpy_rng_state() -> list[Any]:
    """NumPy's state with its key array as a tensor, so rank files load with ``weights_only=True``."""
    kind, keys, *rest = np.random.get_state()  # rest: position, has_gauss, cached gaussian (plain numbers)
    return [kind, torch.from_numpy(keys.astype(np.int64)), *rest]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclasses.dataclass
class ModelSpec:
    """How to rebuild the plain model for the consolidated ``model/`` directory of a checkpoint."""

    config: Any  # model.config.ModelConfig
    head: str
    tokenizer_dir: Path | None  # its files are copied beside the weights
    adapter_base: Any = None  # model.io.AdapterBase: a LoRA run's model directory holds the adapter alone


class TrainingProgress(Protocol):
    """What a checkpoint holds of the trainer besides the strategy's state, and a resume sets back."""

    step: int
    tokens_seen: int
    loader: Any  # state_dict / load_state_dict (a list of old ranks' states on another world size)
    objective: Any  # state_dict / load_state_dict when it has state (e.g. the rollout sampler's RNG)
    guard: LossGuard


class Checkpointer:
    """Saves, verifies and resumes a run's checkpoints under ``checkpoint.dir``: the strategy's state
    (its ``save``/``load``), each rank's loader and RNG state, the trainer's counters and the
    consolidated model directory. Every rank calls :meth:`save` and :meth:`restore` together."""

    def __init__(self, cfg: RunConfig, env: DistEnv, strategy: Strategy, model_spec: ModelSpec) -> None:
        self.cfg = cfg
        self.env = env
        self.strategy = strategy
        self.model_spec = model_spec
        self.writer = CheckpointWriter(cfg.checkpoint_dir, cfg.checkpoint.keep_last, env)
        self.last_saved: Path | None = None  # the last checkpoint written or resumed from
        self.last_saved_step = -1

    # -- resume -----------------------------------------------------------------------------------

    def resume_point(self) -> Path | None:
        """checkpoint.resume: auto → the latest verified checkpoint if any (see :func:`latest`); never → None
        (refused when checkpoint.dir already holds steps); else that path. Verified (sizes and sha256,
        the files shared out among the ranks) before anything is read."""
        resume, root = self.cfg.checkpoint.resume, self.cfg.checkpoint_dir
        if resume == "never":
            held = step_dirs(root)
            if held:  # a fresh run saving beside them would mix two histories in one directory
                raise UserError(f"checkpoint.resume=never, but {root} already holds checkpoints of an "
                                f"earlier run (newest {held[0].name}): set another checkpoint.dir (or log.dir), "
                                "remove them, or continue them with checkpoint.resume=auto")
            return None
        if resume == "auto":
            return latest(root, self.env)
        return resolve(Path(resume), self.env)

    def restore(self, trainer: TrainingProgress) -> None:
        """Resume ``trainer`` as checkpoint.resume says, if there is anything to resume."""
        start = self.resume_point()
        if start is not None:
            self.resume(trainer, start)

    def resume(self, trainer: TrainingProgress, path: Path) -> None:
        """Continue from checkpoint ``path`` (verified), also when it was saved at another world size."""
        state = read_state(path)
        saved_world = state["world_size"]
        if state["format"] != self.strategy.checkpoint_format:
            raise UserError(
                f"checkpoint {path} was saved by {state['strategy']}; {self.cfg.train.strategy} cannot resume it "
                "(start from its weights with model.init and checkpoint.resume=never instead)"
            )
        self.check_adapter_base(path)
        self.strategy.load(path)
        ranks = [load_rank_state(path / rank_file(r)) for r in range(saved_world)]
        copies, rank = state.get("data_copies", 1), self.env.rank
        try:
            if saved_world == self.env.world_size and copies == self.strategy.data_copies:
                trainer.loader.load_state_dict(ranks[rank]["loader"])
                set_rng_state(ranks[rank]["rng"])
                if "objective" in ranks[rank]:
                    trainer.objective.load_state_dict(ranks[rank]["objective"])
            else:  # the loader continues with exactly the units no old data rank consumed
                trainer.loader.load_state_dict([r["loader"] for r in ranks[::copies]])
        except UserError as e:
            raise UserError(f"checkpoint {path}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"checkpoint {path}: the rank files' loader or RNG state is damaged "
                            f"({type(e).__name__}: {e}); the checkpoint cannot be resumed") from None
        trainer.step = state["step"]
        trainer.tokens_seen = state["tokens_seen"]
        trainer.guard.load_state_dict(state["guard"])
        self.last_saved, self.last_saved_step = path, trainer.step
        if self.env.is_main:
            log.info("resumed from %s at step %d", path, trainer.step)

    def check_adapter_base(self, path: Path) -> None:
        """A LoRA checkpoint holds the adapter alone: resuming it on another base than its own would
        silently train something else, so the base's hash must match the one the checkpoint records."""
        from model.io import ADAPTER_CONFIG

        saved = path / STEP_MODEL_DIR / ADAPTER_CONFIG
        base = self.model_spec.adapter_base
        if base is None and not saved.is_file():
            return
        if base is None:
            raise UserError(f"checkpoint {path} holds a LoRA adapter; resume it with the lora section it was "
                            "trained with")
        if not saved.is_file():
            raise UserError(f"checkpoint {path} is a full model's, not a LoRA run's: resume it without lora, or "
                            "start a LoRA run from it with model.init and checkpoint.resume=never")
        recorded = read_yaml(saved)["base_sha256"]
        if recorded != base.sha256:
            raise UserError(f"checkpoint {path} adapts a base with weights sha256 {recorded[:12]}, but model.init "
                            f"{base.path} has {base.sha256[:12]}: resume it on the base it was trained on")

    # -- save -------------------------------------------------------------------------------------

    def save(self, trainer: TrainingProgress) -> Path:
        """Write a complete checkpoint of the trainer's step (all ranks call it together)."""
        if self.last_saved_step == trainer.step:
            return self.last_saved
        weights = self.strategy.full_state_dict()
        self.refuse_non_finite(weights, trainer.step)
        try:
            self.last_saved = self._write(trainer, weights)
        except BaseException as exc:  # torch DCP's CheckpointException is a BaseException
            if not self.writer.out_of_space(exc):
                raise
            raise self.writer.disk_full(trainer.step, self.last_saved) from None
        self.last_saved_step = trainer.step
        return self.last_saved

    def _write(self, trainer: TrainingProgress, weights: dict[str, torch.Tensor] | None) -> Path:
        tmp = self.writer.begin(trainer.step)
        self.strategy.save(tmp)
        rank_state = {"loader": trainer.loader.state_dict(), "rng": rng_state()}
        if hasattr(trainer.objective, "state_dict"):  # e.g. the rollout sampler's RNG
            rank_state["objective"] = trainer.objective.state_dict()
        buffer = io.BytesIO()  # written by Python, so a full disk is an OSError, not torch's "unexpected pos"
        torch.save(rank_state, buffer)
        (tmp / rank_file(self.env.rank)).write_bytes(buffer.getbuffer())
        if self.env.is_main:
            self.write_model_dir(weights, tmp / STEP_MODEL_DIR)
            dump_yaml(self.cfg, tmp / "config.yaml")
        state = {
            "step": trainer.step,
            "tokens_seen": trainer.tokens_seen,
            "world_size": self.env.world_size,
            "data_copies": self.strategy.data_copies,  # tensor-parallel ranks sharing one loader state
            "strategy": str(self.cfg.train.strategy),
            "format": self.strategy.checkpoint_format,
            "guard": trainer.guard.state_dict(),
        }
        return self.writer.commit(tmp, trainer.step, state)

    def refuse_non_finite(self, weights: dict[str, torch.Tensor] | None, step: int) -> None:
        """Stop every rank, before anything is written, when the gathered weights (rank 0's) hold nan/inf."""
        from model.io import non_finite

        bad = non_finite(weights) if self.env.is_main else []
        if all_reduce(torch.tensor([len(bad)], device=self.env.device)).item():
            last = f"the last one is {self.last_saved.name}" if self.last_saved else "there is none yet"
            what = f"{len(bad)} of {len(weights)} weight tensors hold nan or inf (first: {bad[0]})" if bad else \
                "the weights hold nan or inf"
            raise TrainingDiverged(f"step {step}: {what}; no checkpoint was written ({last}); "
                                   "lower train.lr or check the data")

    def write_model_dir(self, weights: dict[str, torch.Tensor], out: Path) -> None:
        """The consolidated model (what ``model.init``, generate and export load; a LoRA run's adapter
        alone) + tokenizer files."""
        from model import build_model
        from model.io import copy_tokenizer_files, save_adapter, save_pretrained
        from model.lora import is_adapter_key

        spec = self.model_spec
        if spec.adapter_base is not None:
            save_adapter({k: v for k, v in weights.items() if is_adapter_key(k)}, self.cfg.lora, spec.adapter_base, out)
        else:
            with torch.device("meta"):  # no init, no memory: the gathered weights are assigned as they are
                plain = build_model(spec.config, head=spec.head)
            plain.load_state_dict(weights, assign=True)
            save_pretrained(plain, out)
        if spec.tokenizer_dir is not None:
            copy_tokenizer_files(spec.tokenizer_dir, out)
