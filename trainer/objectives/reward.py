"""Reward modelling: Bradley–Terry on a scalar score head, ``-log σ(r_chosen - r_rejected)`` per pair.

The model is built with ``head="classifier"`` and ``n_labels=1``: it scores the whole sequence at
its last real token. ``rewards/accuracies`` on the validation split is the share of pairs whose
chosen answer scores higher, the number a reward model is judged by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import ConfigError
from trainer.objectives import Batch, LossOutput, ObjectiveContext
from trainer.objectives.pairs import pair_inputs, reward_metrics


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood that chosen beats rejected."""
    return -F.logsigmoid(chosen - rejected)


class RewardObjective:
    """Pairs are the units; one forward scores chosen and rejected together."""

    data_objective = "preference"

    def count(self, batch: Batch) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        input_ids, kwargs = pair_inputs(batch)
        scores = model(input_ids, **kwargs)
        if scores.dim() != 2 or scores.shape[1] != 1:
            raise ConfigError(f"reward modelling needs one score per sequence (n_labels=1), got {list(scores.shape)}")
        n = batch["chosen_input_ids"].shape[0]
        chosen, rejected = scores[:n, 0], scores[n:, 0]
        losses = bradley_terry_losses(chosen, rejected)
        metrics = reward_metrics(chosen.detach(), rejected.detach())
        return LossOutput(loss_sum=losses.sum(), count=torch.tensor(n, device=scores.device), metrics=metrics)


def build(ctx: ObjectiveContext) -> RewardObjective:
    return RewardObjective()
