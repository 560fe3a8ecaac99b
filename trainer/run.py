"""The one entry point: ``run(cfg, task)`` builds everything a run needs, trains, and reports.

task ∈ {pretrain, sft, align}. For pretrain the objective follows model.arch (decoder → clm,
encoder → mlm, encoder_decoder → span); train.objective overrides it. Works as one process or
as one rank of many (torchrun-style variables; ``launch/`` maps other launchers onto them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from common.config import dump_yaml
from common.errors import ConfigError, UserError
from trainer import checkpoint
from trainer.callbacks import Callback, default_callbacks
from trainer.config import RunConfig
from trainer.distributed import DistEnv, init_distributed, teardown
from trainer.lock import run_lock
from trainer.loop import ModelSpec, Trainer
from trainer.objectives import OBJECTIVES, ObjectiveContext, build_objective, objective_name
from trainer.strategy import build_strategy, needs_process_group

TASKS = ("pretrain", "sft", "align")
log = logging.getLogger("tessera.trainer")


@dataclasses.dataclass
class RunResult:
    steps: int
    losses: list[float]  # the training loss of every step run in this process (not before a resume)
    final_loss: float | None
    eval_loss: float | None
    tokens_seen: int
    run_dir: Path
    checkpoint: Path | None  # the last checkpoint written or resumed from
    preempted: bool
    skipped_shards: list[str] = dataclasses.field(default_factory=list)  # data.on_corrupt=skip: one message each


def accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank; the global batch must split evenly."""
    micro, global_batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if global_batch is None:
        return 1
    if global_batch % (micro * world_size):
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by micro_batch_size × ranks "
            f"= {micro} × {world_size}; pick a multiple of {micro * world_size}"
        )
    return global_batch // (micro * world_size)


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


def model_dir_of(path: Path) -> Path:
    """A checkpoint step directory or checkpoints/ dir → its consolidated model/; other paths as given.
    Only sizes are checked here: ``load_pretrained`` hashes the model/ files it reads."""
    from model.io import STEP_MODEL_DIR

    if (path / checkpoint.LATEST).is_file() or (path / checkpoint.MANIFEST).is_file():
        return checkpoint.resolve(path, hashes=False) / STEP_MODEL_DIR
    return path


def build_model(cfg: RunConfig, head: str, vocab_size: int, n_labels: int | None = None
                ) -> tuple[torch.nn.Module, object]:
    """The model to train and its plain ModelConfig, on the meta device: the strategy materialises it
    (``materialize``, block by block) with the weights of ``torch.manual_seed(train.seed)`` followed by
    ``model.build_model(...)`` or, with model.init, ``model.load_pretrained(...)``. ``n_labels`` sizes
    a classifier head; one of another size in model.init starts afresh."""
    from model import build_model as build

    if cfg.model.init is not None:
        from model.io import load_pretrained

        net = load_pretrained(model_dir_of(cfg.model.init), head=head, lazy=True)
        if n_labels is not None and net.config.n_labels != n_labels:
            with torch.device("meta"):
                fresh = build(dataclasses.replace(net.config, n_labels=n_labels), head=head)
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
        return build(model_cfg, head=head), model_cfg


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
        net.adapter_base = adapter_base_of(model_dir_of(cfg.model.init))
        return
    keys = ("rank", "alpha", "targets", "rslora")
    if any(getattr(saved, k) != getattr(cfg.lora, k) for k in keys):
        want = " ".join(f"lora.{k}={getattr(saved, k)}" for k in keys)
        raise ConfigError(f"model.init={cfg.model.init} is a LoRA adapter ({want}); set the same lora keys to "
                          "continue training it, or start from its merged export (tessera export --merge)")
    net.lora_config = cfg.lora  # the same adapter; dropout and init may differ


def run(cfg: RunConfig, task: str, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train ``cfg`` for ``task``; every rank calls it. Extra ``callbacks`` run after the defaults."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    env = init_distributed(needs_process_group(cfg.train.strategy), cfg.train.dist_timeout_s)
    if env.is_main and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = False
    try:
        with run_lock(cfg.log.dir, env):  # before anything in the run directory is read or written
            result = _run(cfg, task, env, callbacks)
        ok = True
        return result
    finally:
        teardown(barrier=ok)


def _run(cfg: RunConfig, task: str, env: DistEnv, extra: Sequence[Callback]) -> RunResult:
    from data.loader import build_loader
    from data.tokenizer import load_tokenizer

    if cfg.train.strategy == "single" and env.world_size > 1:
        raise ConfigError(
            f"train.strategy=single trains one process, but {env.world_size} ranks were started; "
            "use ddp, fsdp or zero1/2/3 (or start one process)"
        )
    if cfg.data.valid:  # refused now, not at the first evaluation (or never, with train.eval_every=0)
        from data.shards import ShardManifest

        try:
            ShardManifest.load(cfg.data.valid)
        except UserError as exc:
            raise ConfigError(f"data.valid: {exc}") from None

    accumulation = accumulation_steps(cfg, env.world_size // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp))
    tokenizer_dir = run_tokenizer_dir(cfg)
    tokenizer = load_tokenizer(tokenizer_dir)
    name = objective_name(cfg, task)
    spec = OBJECTIVES[name]
    n_labels = classifier_labels(cfg) if spec.class_labels else None
    net, model_cfg = build_model(cfg, spec.head, tokenizer.vocab_size, n_labels)
    if cfg.lora.enabled and env.is_main:
        from model.lora import trainable_summary

        trainable, total = trainable_summary(net)
        log.info("lora: rank %d on %s; trainable parameters %d of %d (%.3f%%)", cfg.lora.rank,
                 ", ".join(cfg.lora.targets), trainable, total, 100 * trainable / total)
    strategy = build_strategy(cfg.train, env, accumulation, cfg.parallel)
    wrapped = strategy.wrap(net)
    objective = build_objective(name, ObjectiveContext(name, cfg, tokenizer, strategy, wrapped))
    torch.manual_seed(cfg.train.seed + env.rank)  # dropout differs per rank, reproducibly

    def loader(split: str):
        return build_loader(
            cfg.data, objective=objective.data_objective, tokenizer=tokenizer, rank=strategy.data_rank,
            world_size=strategy.data_world, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
            split=split,
        )

    from model.flops import flops_per_token

    trainer = Trainer(
        cfg, env, strategy, objective, loader("train"),
        model_spec=ModelSpec(model_cfg, spec.head, tokenizer_dir, net.adapter_base),
        valid_batches=(lambda: loader("valid")) if cfg.data.valid else None,
        flops_per_token=flops_per_token(model_cfg, cfg.data.seq_len),
    )
    trainer.callbacks = default_callbacks(trainer) + list(extra)
    start = resume_point(cfg, env)
    if start is not None:
        trainer.resume(start)
    if env.is_main:
        cfg.log.dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, cfg.log.dir / "config.yaml")
    trainer.fit()
    evals = [m["eval/loss"] for m in trainer.history if "eval/loss" in m]
    losses = [m["loss"] for m in trainer.history]
    return RunResult(
        steps=trainer.step,
        losses=losses,
        final_loss=losses[-1] if losses else None,
        eval_loss=evals[-1] if evals else None,
        tokens_seen=trainer.tokens_seen,
        run_dir=cfg.log.dir,
        checkpoint=trainer.last_saved,
        preempted=trainer.stop_reason == "preempted",
        skipped_shards=trainer.loader.skipped_shards,
    )


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


def resume_point(cfg: RunConfig, env: DistEnv | None = None) -> Path | None:
    """checkpoint.resume: auto → the latest verified checkpoint if any (see checkpoint.latest); never → None
    (refused when checkpoint.dir already holds steps); else that path.
    Verified (sizes and sha256, the files shared out among the ranks of ``env``) before anything is read."""
    resume = cfg.checkpoint.resume
    if resume == "never":
        held = checkpoint.step_dirs(cfg.checkpoint_dir)
        if held:  # a fresh run saving beside them would mix two histories in one directory
            raise UserError(f"checkpoint.resume=never, but {cfg.checkpoint_dir} already holds checkpoints of an "
                            f"earlier run (newest {held[0].name}): set another checkpoint.dir (or log.dir), "
                            "remove them, or continue them with checkpoint.resume=auto")
        return None
    if resume == "auto":
        return checkpoint.latest(cfg.checkpoint_dir, env)
    return checkpoint.resolve(Path(resume), env)
