"""The one entry point: ``run(cfg, task)`` builds everything a run needs, trains, and reports.

task ∈ {pretrain, sft, align}. For pretrain the objective follows model.arch (decoder → clm,
encoder → mlm, encoder_decoder → span); train.objective overrides it. Works as one process or
as one rank of many (torchrun-style variables; ``launch/`` maps other launchers onto them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from common.config import dump_yaml
from common.errors import ConfigError, UserError
from trainer.build import build_run_model, classifier_labels, run_tokenizer_dir
from trainer.callbacks import Callback, default_callbacks
from trainer.checkpoint import ModelSpec
from trainer.config import RunConfig
from trainer.distributed import DistEnv, init_distributed, teardown
from trainer.lock import run_lock
from trainer.loop import Trainer
from trainer.objectives import OBJECTIVES, ObjectiveContext, build_objective, objective_name
from trainer.strategy import build_strategy, needs_process_group

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


def run(cfg: RunConfig, task: str, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train ``cfg`` for ``task``; every rank calls it. Extra ``callbacks`` run after the defaults."""
    cfg.check_task(task)  # before the rendezvous, the model and the data: nothing is built for a refused run
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
    net, model_cfg = build_run_model(cfg, spec.head, tokenizer.vocab_size, n_labels)
    cfg.parallel.check_model(model_cfg)  # model.init's own shape, on the meta device: before any weight
    if cfg.lora.enabled and env.is_main:
        from model.lora import trainable_summary

        trainable, total = trainable_summary(net)
        log.info("lora: rank %d on %s; trainable parameters %d of %d (%.3f%%)", cfg.lora.rank,
                 ", ".join(cfg.lora.targets), trainable, total, 100 * trainable / total)
    strategy = build_strategy(cfg.train, env, accumulation, cfg.parallel, cfg.data.seq_len)
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
        checkpoint=trainer.checkpointer.last_saved,
        preempted=trainer.stop_reason == "preempted",
        skipped_shards=trainer.loader.skipped_shards,
    )
