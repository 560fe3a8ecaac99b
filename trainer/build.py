"""The model of a run, built in one place: the tokenizer it uses, the model (fresh from train.seed,
or ``model.init``; LoRA adapters added), a classifier's labels from the shards, and the DPO
reference's starting model (the same model built a second time)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from common.errors import ConfigError, UserError
from trainer.config import RunConfig


def run_tokenizer_dir(cfg: RunConfig) -> Path:
    """data.tokenizer if set, else the tokenizer saved with model.init (a checkpoint, model directory or
    Hub id), else the one the training shards were made with (``tokenizer_path`` in their manifest.json)."""
    from model.io import find_tokenizer_dir

    candidates = [getattr(cfg.data, "tokenizer", None)]
    if cfg.model.init is not None:
        candidates.append(find_tokenizer_dir(cfg.model.init))
    for spec in cfg.data.datasets():
        manifest = Path(spec.path) / "manifest.json"
        if not manifest.is_file():
            raise UserError(f"data.train: no shards at {spec.path} (expected {manifest}; make them with tessera shard)")
        candidates.append(json.loads(manifest.read_text()).get("tokenizer_path"))
    for candidate in candidates:
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return Path(candidate)
    raise ConfigError("no tokenizer found: the shards' manifest names none that exists; set data.tokenizer")


def build_run_model(cfg: RunConfig, head: str, vocab_size: int, n_labels: int | None = None
                    ) -> tuple[torch.nn.Module, object]:
    """The model to train and its plain ModelConfig, on the meta device: the strategy materialises it
    (``materialize``, block by block) with the weights of ``torch.manual_seed(train.seed)`` followed by
    ``model.build_model(...)`` or, with model.init, ``model.load_pretrained(...)``. ``n_labels`` sizes
    a classifier head; one of another size in model.init starts afresh."""
    from model import build_model

    if cfg.model.init is not None:
        from model.io import load_pretrained

        net = load_pretrained(cfg.model.init, head=head, lazy=True)
        if n_labels is not None and net.config.n_labels != n_labels:
            with torch.device("meta"):
                fresh = build_model(dataclasses.replace(net.config, n_labels=n_labels), head=head)
            fresh.weights_source = {k: v for k, v in net.weights_source.items() if not k.startswith("score.")}
            net = fresh
        if cfg.lora.enabled or net.lora_config is not None:
            add_lora(cfg, net, head)
        return net, net.config
    model_cfg = cfg.model.model_config()
    if n_labels is not None:
        model_cfg = dataclasses.replace(model_cfg, n_labels=n_labels)
    if cfg.model.vocab_from_tokenizer:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size)
    elif model_cfg.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
    with torch.device("meta"):  # the strategy materialises it from train.seed, block by block
        return build_model(model_cfg, head=head), model_cfg


def add_lora(cfg: RunConfig, net: torch.nn.Module, head: str) -> None:
    """Freeze ``net`` and add the lora section's adapters, or check that the adapter model.init
    names (already on ``net``) is the one the section describes; record the base it adapts."""
    from model.io import adapter_base_of
    from model.lora import apply_lora

    if head != "lm":
        raise ConfigError(f"lora: a {head} head would stay frozen at its fresh init; "
                          "train reward models and classifiers without lora")
    saved = net.lora_config
    if saved is None:
        apply_lora(net, cfg.lora)
        net.adapter_base = adapter_base_of(cfg.model.init)
        return
    keys = ("rank", "alpha", "targets", "rslora")
    if any(getattr(saved, k) != getattr(cfg.lora, k) for k in keys):
        want = " ".join(f"lora.{k}={getattr(saved, k)}" for k in keys)
        raise ConfigError(f"model.init={cfg.model.init} is a LoRA adapter ({want}); set the same lora keys to "
                          "continue training it, or start from its merged export (tessera export --merge)")
    net.lora_config = cfg.lora  # the same adapter; dropout and init may differ


def classifier_labels(cfg: RunConfig) -> int:
    """How many labels the training shards name (data.valid must name the same, in order)."""
    from data.tasks import manifest_labels

    datasets = cfg.data.datasets()
    labels = manifest_labels(datasets[0].path)
    for path in [d.path for d in datasets[1:]] + ([cfg.data.valid] if cfg.data.valid else []):
        if manifest_labels(path) != labels:
            raise UserError(f"{path} labels {manifest_labels(path)} differ from {datasets[0].path}'s {labels}; "
                            "shard every split with the same --labels")
    return len(labels)


def starting_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    """A fresh copy of the policy as it starts training (same weights, same seed): the DPO reference."""
    net, _ = build_run_model(cfg, "lm", vocab_size)
    return net
