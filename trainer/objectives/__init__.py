"""Objectives: loss functions over batches, behind one protocol the loop drives.

An objective turns one micro-batch into a *sum* of per-unit losses and the number of units
(target tokens for language modelling, pairs for preference losses). The loop never averages
per micro-batch: before any forward it adds ``count(batch)`` over the accumulation steps and
all-reduces it over ranks, then back-propagates ``loss_sum * world_size / global_count`` for each
micro-batch (data-parallel gradient reduction averages over ranks). The step's gradient is thus
exactly that of the mean over every unit of the global batch, however tokens fall across
micro-steps and ranks.

An objective that makes its own batches from the loader's (online alignment samples completions
from the policy) also has ``rollout(model, draw, train) -> (batches, metrics)``: the loop calls it
before counting units, ``draw()`` giving the step's micro-batches from the loader (a rollout reused
for several updates draws none), and ``state_dict``/``load_state_dict`` for what it keeps across
steps (its sampler's RNG, a rollout being reused), saved with every rank's checkpoint state.

To add an objective, write a module here named after it, with a class that satisfies
:class:`Objective` and a ``build(ctx: ObjectiveContext) -> Objective`` function, and add its row to
:data:`ROWS` (:class:`ObjectiveName` and :data:`OBJECTIVES` are made from that table). Its class
names the batches it reads (``data_objective``, a row of ``data.loader.DATA_OBJECTIVES``).
``ctx`` carries the run config, tokenizer and strategy (``ctx.strategy.wrap_frozen(model)``
shards a frozen reference model the same way as the trained one).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from typing import TYPE_CHECKING, Any, Protocol

import torch

from common.errors import ConfigError

if TYPE_CHECKING:
    from trainer.config import RunConfig
    from trainer.strategy import Strategy

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass
class LossOutput:
    """``loss_sum``: summed loss over this micro-batch's units (a scalar that back-propagates);
    ``count``: the units in it (a scalar tensor, equal to ``count(batch)``); ``metrics``: extra
    scalars to log (e.g. ``rewards/accuracies``), each a *sum* over units, divided by the global
    count by the loop like the loss; ``ratios``: metrics that are means over units of their own
    (``kl`` over completion tokens) as (numerator, denominator) sums, each added over micro-batches
    and ranks by the loop before it divides."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    ratios: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


class Objective(Protocol):
    data_objective: str
    """Which collator the data loader uses (a row of data.loader.DATA_OBJECTIVES)."""

    def count(self, batch: Batch) -> int:
        """Loss units in ``batch``, known before any forward."""
        ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        """Forward ``batch`` through ``model`` (as wrapped by the strategy) and sum the loss."""
        ...


@dataclasses.dataclass
class ObjectiveContext:
    """What an objective's ``build`` may need."""

    name: str  # the registry name it was built for (e.g. "sft" builds the CLM loss on sft batches)
    cfg: RunConfig
    tokenizer: Any
    strategy: Strategy | None  # None outside a run (trainer.evaluation builds objectives for tessera eval)
    model: torch.nn.Module  # the trained model, already wrapped by the strategy (if any)


TASKS = ("pretrain", "sft", "align")  # the training commands: tessera pretrain|sft|align


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """One row of :data:`OBJECTIVES`: what the run builds for the objective (its ``build`` is in
    ``trainer/objectives/<name>.py``) and which command trains it."""

    task: str  # the one of TASKS that trains it (another refuses train.objective at load)
    head: str = "lm"  # "lm" or "classifier" (a scalar or per-class head over the final hidden state)
    class_labels: bool = False  # the classifier's classes come from the shards' labels


ROWS: dict[str, ObjectiveSpec] = {  # the one table to edit: its names make ObjectiveName
    "clm": ObjectiveSpec("pretrain"),
    "mlm": ObjectiveSpec("pretrain"),
    "span": ObjectiveSpec("pretrain"),
    "sft": ObjectiveSpec("sft"),
    "preference": ObjectiveSpec("align"),
    "reward": ObjectiveSpec("align", head="classifier"),
    "classify": ObjectiveSpec("sft", head="classifier", class_labels=True),
    "seq2seq": ObjectiveSpec("sft"),
    "online": ObjectiveSpec("align"),
    "kto": ObjectiveSpec("align"),
    "ppo": ObjectiveSpec("align"),
}

ObjectiveName = enum.StrEnum("ObjectiveName", {name: name for name in ROWS}, module=__name__)
ObjectiveName.__doc__ = "What ``train.objective`` may name (a typo fails at config load): the rows of OBJECTIVES."
OBJECTIVES: dict[ObjectiveName, ObjectiveSpec] = {ObjectiveName(name): spec for name, spec in ROWS.items()}

# what each pretraining architecture learns when train.objective is not set
PRETRAIN_OBJECTIVE = {"decoder": ObjectiveName.clm, "encoder": ObjectiveName.mlm,
                      "encoder_decoder": ObjectiveName.span}


def objective_name(cfg: RunConfig, task: str) -> ObjectiveName:
    """The objective a run trains: train.objective if set, else what the task and arch imply."""
    if cfg.train.objective:
        return ObjectiveName(cfg.train.objective)
    if task == "pretrain":
        return PRETRAIN_OBJECTIVE[str(cfg.model.arch)]
    return {"sft": ObjectiveName.sft, "align": cfg.align.loss.objective}[task]


def build_objective(name: str, ctx: ObjectiveContext) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"train.objective: {name!r} is not one of {', '.join(OBJECTIVES)}")
    return importlib.import_module(f"trainer.objectives.{name}").build(ctx)
