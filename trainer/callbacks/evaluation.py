"""Evaluate every N steps on the first ``eval_steps`` batches of the validation split: the loss, the
objective's own metrics (e.g. ``eval/rewards/accuracies``) and, for token objectives, perplexity;
and on each ``train.eval_tasks`` file its multiple-choice ``eval/<name>/acc`` and ``acc_norm``, as
``tessera eval --tasks`` scores them. The loop and the metrics are :mod:`trainer.evaluation`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import ConfigError
from trainer.callbacks import Callback, TrainerView
from trainer.evaluation import model_kind, perplexity, score_choices, token_level


class Evaluation(Callback):
    def __init__(self, trainer: TrainerView, every: int, steps: int, tasks: list[str]) -> None:
        self.every = every
        self.steps = steps
        self.tasks: dict[str, list] = {}
        self.tokenizer = None
        if tasks:
            from data.tasks import read_multiple_choice
            from data.tokenizer import load_tokenizer
            from trainer.distributed import unwrap

            what, decoder = model_kind(unwrap(trainer.model))
            if not decoder:
                raise ConfigError(f"train.eval_tasks: multiple-choice tasks need a decoder LM; this run trains {what}")
            self.tasks = {Path(task).stem: read_multiple_choice(task) for task in tasks}
            self.tokenizer = load_tokenizer(trainer.model_spec.tokenizer_dir)

    def on_step_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        if trainer.step % self.every and trainer.step != trainer.cfg.train.max_steps:
            return
        if trainer.valid_batches is not None:
            values = trainer.evaluate(self.steps)
            metrics.update({f"eval/{name}": value for name, value in values.items()})
            if token_level(trainer.objective):
                metrics["eval/ppl"] = perplexity(values["loss"])
        if self.tasks:
            trainer.model.eval()
            for name, items in self.tasks.items():
                scores = score_choices(trainer.model, self.tokenizer, items,
                                       batch_size=trainer.cfg.train.micro_batch_size, rank=trainer.strategy.data_rank,
                                       world_size=trainer.strategy.data_world, device=trainer.env.device,
                                       autocast=trainer.strategy.autocast)
                metrics.update({f"eval/{name}/acc": scores["acc"], f"eval/{name}/acc_norm": scores["acc_norm"]})
            trainer.model.train()
