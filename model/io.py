"""Model directories: ``model.safetensors`` + ``model.yaml`` (the ModelConfig and the head), with any
tokenizer files beside them. ``load_pretrained`` also reads Hugging Face directories (config.json)
and follows a ``latest`` file (a trainer's ``checkpoints/`` directory) to the step it names. The
``model/`` of a trainer's step is checked against the step's manifest (sizes, sha256) before it is read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from common import manifest
from common.config import read_json_object, read_yaml
from common.errors import UserError
from model.config import ModelConfig
from model.lazy_weights import LazyTensor, read_lazy
from model.transformer import HEADS, SequenceClassifier, TesseraModel, build_model

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded Hugging Face checkpoints
CONFIG = "model.yaml"
HF_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
LATEST = "latest"
STEP_MODEL_DIR = "model"  # the consolidated weights inside a trainer's step directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def resolve_checkpoint(path: str | Path) -> Path:
    """The model directory ``path`` means: itself, its ``model/`` (a trainer's step directory), or
    (repeatedly) the sub-directory its ``latest`` names (a trainer's ``checkpoints/`` directory)."""
    path = Path(path)
    for _ in range(8):
        if not path.is_dir():
            raise UserError(f"checkpoint not found: {path} is not a directory")
        if (path / CONFIG).is_file() or (path / HF_CONFIG).is_file():
            return path
        if (path / STEP_MODEL_DIR / CONFIG).is_file():
            return path / STEP_MODEL_DIR
        latest = path / LATEST
        if not latest.is_file():
            raise UserError(f"{path}: not a model directory (no {CONFIG}, {HF_CONFIG} or {LATEST} file)")
        name = latest.read_text().strip()
        if not name:
            raise UserError(f"{latest}: empty; it should hold the name of a checkpoint sub-directory")
        path = path / name
    raise UserError(f"{path}: too many nested '{LATEST}' files")


def check_saved_hashes(directory: Path) -> None:
    """A trainer step's ``model/`` (its parent holds the step's manifest): every file of it listed there
    must have its size and sha256, or the load fails with one line naming the file."""
    if directory.name == STEP_MODEL_DIR and (directory.parent / manifest.MANIFEST).is_file():
        manifest.verify(directory.parent, under=STEP_MODEL_DIR)


def head_of(model: TesseraModel) -> str:
    return "classifier" if isinstance(model, SequenceClassifier) else "lm"


def save_pretrained(model: TesseraModel, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``model.yaml`` into ``directory`` (each file atomically)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic(directory / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    meta = {**model.config.to_dict(), "head": head_of(model)}
    _atomic(directory / CONFIG, lambda tmp: tmp.write_text(yaml.safe_dump(meta, sort_keys=False)))
    return directory


def load_pretrained(path: str | Path, head: str | None = None, lazy: bool = False) -> TesseraModel:
    """Load a Tessera or Hugging Face model directory (or a checkpoints dir with ``latest``).

    ``head`` overrides the saved head: an LM checkpoint loaded with ``head="classifier"`` keeps its
    body and starts a fresh score head (a reward model from an SFT model). Fresh tensors come from
    torch's global RNG, as in :func:`build_model`. ``lazy`` returns the model on the meta device with
    its checkpoint tensors attached, checked but unread: ``materialize`` reads them block by block.
    """
    directory = resolve_checkpoint(path)
    check_saved_hashes(directory)
    if (directory / CONFIG).is_file():
        meta = read_yaml(directory / CONFIG)
        saved_head = meta.pop("head", "lm")
        cfg = ModelConfig.from_dict(meta, "model")
        weights = read_lazy(directory / WEIGHTS)
    else:
        from model.hf import config_from_hf, layout_for_hf, state_from_hf

        hf_config = read_json_object(directory / HF_CONFIG)
        layout_for_hf(hf_config)  # an unsupported model type fails before its weights are read
        tensors = read_hf_weights(directory)
        cfg = config_from_hf(hf_config, tensors)
        saved_head, weights = "lm", state_from_hf(tensors, cfg)
    head = head or saved_head
    if head not in HEADS:
        raise UserError(f"unknown model head {head!r}; choose from {', '.join(HEADS)}")
    device = torch.get_default_device()
    with torch.device("meta"):
        model = build_model(cfg, head)
    model.weights_source = _fitting(model, weights, directory, keep_body=head != saved_head)
    if not lazy and device.type != "meta":
        model.materialize(device)
    return model


def _fitting(model: TesseraModel, weights: dict[str, LazyTensor], directory: Path, keep_body: bool
             ) -> dict[str, LazyTensor]:
    """The checkpoint tensors ``model`` takes (all of them, or with ``keep_body`` the shared body:
    embed.*, stack.*), after checking names and shapes."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if keep_body:
        weights = {k: v for k, v in weights.items() if k.startswith(("embed.", "stack."))}
        expected = {k: v for k, v in expected.items() if k.startswith(("embed.", "stack."))}
        if set(expected) - set(weights) or any(weights[k].shape != shape for k, shape in expected.items()):
            raise UserError(f"{directory}: weights do not fit a {head_of(model)} model of this config")
        return weights
    problems = [f"missing tensor {k!r}" for k in sorted(set(expected) - set(weights))]
    problems += [f"unexpected tensor {k!r}" for k in sorted(set(weights) - set(expected))]
    problems += [f"{k!r} has shape {list(weights[k].shape)}, the config says {list(shape)}"
                 for k, shape in expected.items() if k in weights and weights[k].shape != shape]
    if problems:
        raise UserError(f"{directory / WEIGHTS}: weights do not match {CONFIG}: {problems[0]}")
    return weights


def read_hf_weights(directory: Path) -> dict[str, LazyTensor]:
    """All tensors of a Hugging Face directory (unread): ``model.safetensors``, or the shards its index names."""
    index = directory / WEIGHTS_INDEX
    if (directory / WEIGHTS).is_file() or not index.is_file():
        if not (directory / WEIGHTS).is_file() and (directory / "pytorch_model.bin").is_file():
            raise UserError(f"{directory}: only pytorch_model.bin found; save the model with safetensors "
                            "(transformers: save_pretrained(..., safe_serialization=True))")
        return read_lazy(directory / WEIGHTS)
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise UserError(f"{index}: no weight_map")
    tensors: dict[str, LazyTensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read_lazy(directory / shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise UserError(f"{index}: tensor {missing[0]!r} is in no shard")
    return tensors


def find_tokenizer_dir(path: str | Path) -> Path | None:
    """Where the tokenizer of checkpoint ``path`` lives: the resolved model directory, else ``path``."""
    for candidate in (resolve_checkpoint(path), Path(path)):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer files found in ``source`` to ``target``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_hf(model: TesseraModel, directory: str | Path) -> Path:
    """Write the Hugging Face layout (``config.json`` + ``model.safetensors``) of an LM model."""
    from safetensors.torch import save_file

    from model.hf import config_to_hf, state_to_hf

    if head_of(model) != "lm":
        raise UserError("only LM models export to a Hugging Face layout (this one has a classifier head)")
    hf_config = config_to_hf(model.config)
    tensors = state_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic(directory / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _atomic(directory / HF_CONFIG, lambda tmp: tmp.write_text(json.dumps(hf_config, indent=2) + "\n"))
    return directory


def save_hf_token_ids(directory: str | Path, *, bos: int | None, stops: list[int], pad: int | None,
                      max_new_tokens: int) -> None:
    """Name the special ids in an exported ``config.json`` and write ``generation_config.json``, so
    that transformers' ``generate`` (and vLLM) stop where ``tessera generate`` stops: at any of ``stops``."""
    directory = Path(directory)
    ids = {"bos_token_id": bos, "eos_token_id": stops[0] if len(stops) == 1 else stops or None, "pad_token_id": pad}
    ids = {k: v for k, v in ids.items() if v is not None}
    hf_config = {**read_json_object(directory / HF_CONFIG), **ids}
    generation = {**ids, "do_sample": False, "max_new_tokens": max_new_tokens}
    _atomic(directory / HF_CONFIG, lambda tmp: tmp.write_text(json.dumps(hf_config, indent=2) + "\n"))
    _atomic(directory / HF_GENERATION_CONFIG, lambda tmp: tmp.write_text(json.dumps(generation, indent=2) + "\n"))
