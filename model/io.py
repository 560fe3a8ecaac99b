"""Model directories: ``model.safetensors`` + ``model.yaml`` (the ModelConfig and the head), with any
tokenizer files beside them. ``load_pretrained`` also reads Hugging Face directories (config.json)
and follows a ``latest`` file (a trainer's ``checkpoints/`` directory) to the step it names. The
``model/`` of a trainer's step is checked against the step's manifest (sizes, sha256) before it is read.

A LoRA run's model directory holds the adapter alone: ``adapter.safetensors`` + ``adapter.yaml`` (the
lora section, and the base model it adapts: its directory and the sha256 of its weights, checked when
the adapter is loaded). ``save_peft_adapter`` writes the same adapter in PEFT's layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from common import manifest
from common.checkpoint_layout import STEP_MODEL_DIR, is_step, named_by_latest
from common.config import read_json_object, read_yaml
from common.errors import UserError
from common.hub import hub_snapshot, looks_like_hub_id
from model.config import ModelConfig
from model.lazy_weights import LazyTensor, read_lazy
from model.transformer import HEADS, SequenceClassifier, TesseraModel, build_model

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded Hugging Face checkpoints
CONFIG = "model.yaml"
HF_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.yaml"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def resolve_checkpoint(path: str | Path) -> Path:
    """The model directory ``path`` means: itself, its ``model/`` (a trainer's step directory),
    (repeatedly) the sub-directory its ``latest`` names (a trainer's ``checkpoints/`` directory), or
    the cached snapshot of a Hugging Face Hub id (:mod:`common.hub`). The one resolver of checkpoint
    paths; the layout it walks is :mod:`common.checkpoint_layout`'s."""
    path = Path(path)
    if looks_like_hub_id(path):
        return hub_snapshot(str(path))
    for _ in range(8):
        if not path.is_dir():
            raise UserError(f"checkpoint not found: {path} is not a directory")
        if any((path / name).is_file() for name in (CONFIG, HF_CONFIG, ADAPTER_CONFIG)):
            return path
        if is_step(path) or any((path / STEP_MODEL_DIR / name).is_file() for name in (CONFIG, ADAPTER_CONFIG)):
            return path / STEP_MODEL_DIR  # a step's own files are checked when they are read
        named = named_by_latest(path)
        if named is None:
            raise UserError(f"{path}: not a model directory (no {CONFIG}, {HF_CONFIG} or latest file)")
        path = named
    raise UserError(f"{path}: too many nested 'latest' files")


def check_saved_hashes(directory: Path) -> None:
    """A trainer step's ``model/`` (its parent holds the step's manifest): every file of it listed there
    must have its size and sha256, or the load fails with one line naming the file. A step directory
    without its manifest (a save that never finished, e.g. a ``.tmp_step_N``) is refused."""
    if directory.name == STEP_MODEL_DIR and is_step(directory.parent):
        manifest.verify(directory.parent, under=STEP_MODEL_DIR)  # no manifest beside the state: "incomplete"


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
    """Load a Tessera or Hugging Face model directory (a checkpoints dir with ``latest``, or a Hub id).

    ``head`` overrides the saved head: an LM checkpoint loaded with ``head="classifier"`` keeps its
    body and starts a fresh score head (a reward model from an SFT model). Fresh tensors come from
    torch's global RNG, as in :func:`build_model`. ``lazy`` returns the model on the meta device with
    its checkpoint tensors attached, checked but unread: ``materialize`` reads them block by block.
    """
    directory = resolve_checkpoint(path)
    check_saved_hashes(directory)
    if (directory / ADAPTER_CONFIG).is_file():
        return _load_adapter(directory, head, lazy)
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
        refuse_non_finite(model.state_dict(), str(directory))
    return model


@dataclasses.dataclass(frozen=True)
class AdapterBase:
    """The model a LoRA adapter adapts: its directory and the sha256 of its weights."""

    path: Path
    sha256: str


def weights_sha256(directory: Path) -> str:
    """sha256 of a model directory's ``model.safetensors`` (as its step manifest lists it); of a sharded
    one, the sha256 of its shards' names and sha256s, in name order."""
    if (directory / WEIGHTS).is_file():
        return manifest.sha256_file(directory / WEIGHTS)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory}: no weights (*.safetensors) found")
    lines = "".join(f"{f.name} {manifest.sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def adapter_base_of(path: str | Path) -> AdapterBase:
    """What a LoRA run on ``model.init=path`` adapts: that model, or the base of the adapter it names."""
    directory = resolve_checkpoint(path).resolve()
    if (directory / ADAPTER_CONFIG).is_file():
        return _checked_base(directory, read_yaml(directory / ADAPTER_CONFIG))
    return AdapterBase(directory, weights_sha256(directory))


def _checked_base(directory: Path, meta: dict) -> AdapterBase:
    base = AdapterBase(Path(meta["base"]), meta["base_sha256"])
    if not base.path.is_dir():
        raise UserError(f"{directory}: the base model it adapts, {base.path}, is not there")
    now = weights_sha256(resolve_checkpoint(base.path))
    if now != base.sha256:
        raise UserError(f"{directory}: its base model {base.path} has changed since the adapter was trained "
                        f"(weights sha256 {now[:12]}, the adapter records {base.sha256[:12]}); use that base")
    return base


def save_adapter(adapter: dict[str, torch.Tensor], lora, base: AdapterBase, directory: str | Path) -> Path:
    """A LoRA run's model directory: the adapter tensors and what they adapt (``lora`` a LoraConfig)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.items()}
    _atomic(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    meta = {"lora": lora.to_dict(), "base": str(base.path), "base_sha256": base.sha256}
    _atomic(directory / ADAPTER_CONFIG, lambda tmp: tmp.write_text(yaml.safe_dump(meta, sort_keys=False)))
    return directory


def _load_adapter(directory: Path, head: str | None, lazy: bool) -> TesseraModel:
    from model.lora import LoraConfig, apply_lora, is_adapter_key

    meta = read_yaml(directory / ADAPTER_CONFIG)
    base = _checked_base(directory, meta)
    if head not in (None, "lm"):
        raise UserError(f"{directory}: a LoRA adapter of an LM cannot be loaded with a {head} head")
    device = torch.get_default_device()
    model = load_pretrained(base.path, lazy=True)
    apply_lora(model, LoraConfig.from_dict(meta["lora"], f"{directory / ADAPTER_CONFIG}: lora"))
    adapter = read_lazy(directory / ADAPTER_WEIGHTS)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if is_adapter_key(k)}
    if set(adapter) != set(expected) or any(adapter[k].shape != shape for k, shape in expected.items()):
        odd = sorted(set(adapter) ^ set(expected)) or [k for k in expected if adapter[k].shape != expected[k]]
        raise UserError(f"{directory / ADAPTER_WEIGHTS}: does not match {ADAPTER_CONFIG} (tensor {odd[0]!r})")
    model.weights_source.update(adapter)
    model.adapter_base = base
    if not lazy and device.type != "meta":
        model.materialize(device)
        refuse_non_finite(model.state_dict(), str(directory))
    return model


def save_peft_adapter(model: TesseraModel, directory: str | Path, base_dir: str | Path) -> Path:
    """Write ``model``'s adapters as PEFT does (``adapter_config.json`` + ``adapter_model.safetensors``), for
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), directory)``."""
    from safetensors.torch import save_file

    from model.config import Arch
    from model.hf import adapter_to_hf, layout_for
    from model.lora import is_adapter_key

    lora = model.lora_config
    adapter = adapter_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items() if is_adapter_key(k)},
                            model.config)

    def alpha(rank: int) -> float:  # the same scaling whatever the module's rank
        return lora.scaling * (rank**0.5 if lora.rslora else rank)

    odd = {m: r for m, r in adapter.ranks.items() if r != lora.rank}
    task = {Arch.decoder: "CAUSAL_LM", Arch.encoder_decoder: "SEQ_2_SEQ_LM"}.get(model.config.arch)
    config = {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": str(Path(base_dir).resolve()),
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
        "target_modules": sorted(adapter.ranks), "rank_pattern": {_exact(m): r for m, r in odd.items()},
        "alpha_pattern": {_exact(m): alpha(r) for m, r in odd.items()}, "bias": "none",
        "fan_in_fan_out": layout_for(model.config).model_type == "gpt2", "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "use_dora": False,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic(directory / PEFT_WEIGHTS, lambda tmp: save_file(adapter.tensors, str(tmp), metadata={"format": "pt"}))
    _atomic(directory / PEFT_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def import_peft_adapter(adapter_dir: str | Path, base_dir: str | Path, directory: str | Path) -> TesseraModel:
    """A Tessera adapter directory (on ``base_dir``, Tessera or Hugging Face) from a PEFT LoRA adapter
    directory; returns the adapted model, loaded."""
    from safetensors.torch import load_file

    from model.hf import adapter_from_hf
    from model.lora import LoraConfig

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / PEFT_CONFIG).is_file() or not (adapter_dir / PEFT_WEIGHTS).is_file():
        raise UserError(f"{adapter_dir}: not a PEFT adapter directory (needs {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    base_path = resolve_checkpoint(base_dir).resolve()
    base = AdapterBase(base_path, weights_sha256(base_path))
    cfg = load_pretrained(base.path, lazy=True).config
    tensors, peft_config = load_file(str(adapter_dir / PEFT_WEIGHTS)), read_json_object(adapter_dir / PEFT_CONFIG)
    state, lora = adapter_from_hf(tensors, peft_config, cfg)
    save_adapter(state, LoraConfig.from_dict(lora, "lora"), base, directory)
    return load_pretrained(directory)


def _exact(module: str) -> str:
    """A PEFT rank/alpha pattern (a regex matched at the end of a module name) for exactly ``module``."""
    import re

    return re.escape(module)


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a nan or an inf."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """One line, naming the first tensor, when any weight is nan or inf (a diverged model)."""
    bad = non_finite(tensors)
    if bad:
        raise UserError(f"{where}: {len(bad)} of {len(tensors)} weight tensors hold nan or inf (first: {bad[0]}); "
                        "the model diverged: use an earlier checkpoint")


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
    refuse_non_finite(tensors, f"export to {directory}")
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
